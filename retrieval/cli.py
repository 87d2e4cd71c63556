"""The ``xmr`` command line: a thin layer over :mod:`retrieval.engine`.

Each command opens what it needs, calls one library function and turns
library errors into one-line messages. torch and faiss load lazily, so
``xmr --help`` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from .errors import XmrError

log = logging.getLogger("xmr")


def default_index_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "xmr" / "index"


def _progress(desc: str, total: int | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, file=sys.stderr,
                disable=None if sys.stderr.isatty() else False, mininterval=1.0)


class _Group(click.Group):
    """Turns XmrError into a clean one-line error for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except XmrError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--index", "index_dir", envvar="XMR_INDEX", type=click.Path(file_okay=False),
              default=None, help="Index directory (env XMR_INDEX; default: the user data directory).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="xmr-search", prog_name="xmr")
@click.pass_context
def cli(ctx, index_dir, verbose):
    """xmr: search your images by text, find captions for an image, offline."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"index_dir": Path(index_dir) if index_dir else default_index_dir()}


@cli.command()
@click.option("--dataset", required=True, type=click.Path(exists=True),
              help="Flickr8k-layout folder or Karpathy-split JSON.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Image folder (for a JSON dataset).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--image-tower", default="efficientnet-lite2", show_default=True,
              type=click.Choice(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
@click.option("--image-size", type=int, default=None, help="Input resolution (default: the tower's native size).")
@click.option("--embed-dim", type=int, default=256, show_default=True)
@click.option("--text-layers", type=int, default=2, show_default=True, help="Top MiniLM layers to fine-tune.")
@click.option("--stages", default="dual,rerank", show_default=True, help="Comma-separated: dual, rerank.")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), help="Start from this checkpoint's dual encoder.")
@click.option("--epochs", type=int, default=15, show_default=True, help="Dual-encoder epochs (over all captions).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr-image", type=float, default=2e-4, show_default=True)
@click.option("--lr-text", type=float, default=2e-5, show_default=True)
@click.option("--freeze-image-tower", is_flag=True, help="Train only heads and text layers.")
@click.option("--rerank-epochs", type=int, default=6, show_default=True)
@click.option("--rerank-width", type=int, default=256, show_default=True)
@click.option("--rerank-layers", type=int, default=2, show_default=True)
@click.option("--ablations", default="", help="Comma-separated reranker ablations: no_region,no_word,no_global,one_way,random_neg.")
@click.option("--limit", type=int, default=None, help="Use only the first N images of each split (smoke tests).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=8, show_default=True, help="Image decoding threads.")
def train(dataset, images, out_dir, image_tower, image_size, embed_dim, text_layers, stages, resume, epochs,
          batch_size, lr_image, lr_text, freeze_image_tower, rerank_epochs, rerank_width, rerank_layers,
          ablations, limit, device, seed, threads):
    """Train the dual encoder and the reranker on a dataset's train split."""
    from .training.dual import DualTrainOptions
    from .training.rerank import RerankTrainOptions
    from .training.run import TrainJob, run_training

    job = TrainJob(
        dataset=dataset, images=images, out_dir=out_dir, image_tower=image_tower, image_size=image_size,
        embed_dim=embed_dim, text_trainable_layers=text_layers,
        stages=tuple(s for s in stages.split(",") if s), resume=resume,
        ablations=tuple(a for a in ablations.split(",") if a), limit=limit, device=device, threads=threads,
        dual=DualTrainOptions(epochs=epochs, batch_size=batch_size, lr_image=lr_image, lr_text=lr_text,
                              train_image_tower=not freeze_image_tower, seed=seed),
        rerank=RerankTrainOptions(epochs=rerank_epochs, seed=seed),
        reranker_width=rerank_width, reranker_layers=rerank_layers,
    )
    try:
        report = run_training(job, _progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = {"dual_dev": report.get("dual_dev"), "dual_test": report.get("dual_test")}
    for name, entry in report.get("rerank", {}).items():
        summary[f"rerank_{name}"] = {s: {k: round(v["rsum"], 1) for k, v in entry.get(s, {}).items()} for s in ("dev", "test")}
    click.echo(json.dumps(summary, indent=2))


def main() -> None:
    cli(prog_name="xmr")


if __name__ == "__main__":
    main()
