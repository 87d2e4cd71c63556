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

from .errors import XmrError, database_error_advice, database_error_detail, os_error_message
from .threads import share_cpu

log = logging.getLogger("xmr")


def default_index_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "xmr" / "index"


def _progress(desc: str, total: int | None, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr,
                disable=None if sys.stderr.isatty() else False, mininterval=1.0)


class _Group(click.Group):
    """Turns XmrError into a clean one-line error for every command."""

    def invoke(self, ctx):
        from sqlalchemy.exc import DatabaseError

        try:
            return super().invoke(ctx)
        except XmrError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a full disk, a permission, a read-only folder: one line, not a traceback
            raise click.ClickException(os_error_message(exc)) from None
        except DatabaseError as exc:  # damaged after it opened: say so in one line
            detail = database_error_detail(exc)
            raise click.ClickException(f"the index database failed ({detail}); {database_error_advice(detail)}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--index", "index_dir", envvar="XMR_INDEX", type=click.Path(file_okay=False),
              default=None, help="Index directory (env XMR_INDEX; default: the user data directory).")
@click.option("--database", envvar="XMR_DATABASE", default=None, metavar="URL",
              help="Where a new index keeps its rows: postgresql://USER@HOST/DB (a schema of its own there; needs "
                   "the postgresql extra). Default: SQLite in the index directory. An index remembers where it was "
                   "created (env XMR_DATABASE).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="xmr-search", prog_name="xmr")
@click.pass_context
def cli(ctx, index_dir, database, verbose):
    """xmr: search your images by text, find captions for an image, offline."""
    share_cpu()  # before any command imports torch
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = {"index_dir": Path(index_dir) if index_dir else default_index_dir(), "database": database or ""}


def _quiet_transformers() -> None:
    """No info logs or weight-loading bars from transformers, without importing
    it (only Hugging Face models need it; the import costs about a second)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported: its settings are read
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _open(ctx, model=None, create=False, rerank=True, reranker=None, upgrade=False):
    from .engine import Engine

    _quiet_transformers()
    choice = "none" if not rerank else (reranker or "auto")
    return Engine.open(ctx.obj["index_dir"], model=model, create=create, reranker=choice,
                       device=ctx.obj.get("device"), upgrade=upgrade, database=ctx.obj.get("database", ""))


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, indent=None))


def _shown(text: str) -> str:
    """``text`` on one terminal line: control characters (a newline in a file
    name, say) written as escapes, so each result stays one line. --json output
    keeps the exact strings."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _print_images(hits, engine, under: str | None = None) -> None:
    if not hits:
        if engine.store.count_images() == 0:
            click.echo(f"no results: the index in {engine.index_dir} holds no images yet; add some with: "
                       "xmr index FOLDER")
        elif under is not None and not len(engine.store.image_ids_under(os.path.abspath(under))):
            click.echo(f"no results: no indexed images below {_shown(os.path.abspath(under))}")
        else:
            click.echo("no results")
        return
    for h in hits:
        mark = "*" if h.reranked else " "
        click.echo(f"{h.rank:>4}  {h.score:>8.4f}{mark} {_shown(h.path)}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--model", default=None,
              help="Encoder for a new index: xmr-lite2-open (default), xmr-lite2, a Hugging Face CLIP/SigLIP name or folder.")
@click.option("--batch-size", type=click.IntRange(1, 65536), default=32, show_default=True,
              help="Images written to the index in one transaction (and, without --ray, embedded at a time).")
@click.option("--threads", type=int, default=None, help="Decoding threads (default: 2 per core, at most 8).")
@click.option("--processes", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Decode in this many worker processes instead of threads (many-core machines feeding a GPU).")
@click.option("--ray", "use_ray", is_flag=True,
              help="List, decode and embed on a Ray cluster (needs the ray extra); this process writes the index.")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="The Ray cluster to join (HOST:PORT or ray://HOST:10001), or 'local' for a Ray runtime of "
                   "this machine alone [default: RAY_ADDRESS, else the cluster `ray start` started here, else "
                   "local]. Implies --ray.")
@click.option("--ray-encoders", type=click.IntRange(1, 4096), default=None,
              help="Encoder actors on Ray [default: one per GPU, else one per 4 CPUs; CPU actors always leave "
                   "one CPU for decoding].")
@click.option("--ray-batch-size", type=click.IntRange(1, 65536), default=128, show_default=True,
              help="Images a Ray decoding task or encoder call takes at a time.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no per-file skip messages.")
@click.option("--prune", is_flag=True,
              help="Also remove images whose whole folder is missing, empty or unreadable (kept as offline "
                   "otherwise: an unmounted drive or share keeps its images).")
@click.pass_context
def index(ctx, paths, model, batch_size, threads, processes, use_ray, ray_address, ray_encoders, ray_batch_size,
          quiet, prune):
    """Index image files and folders (recursively; incremental).

    A file deleted from a folder leaves the index. A folder that is missing,
    empty or unreadable as a whole (an unmounted drive, a network share, no
    permission) keeps its images, reported as offline; --prune removes them.

    With --ray, Ray tasks list the folders and read and decode the files, and
    encoder actors embed them (one per GPU where the cluster has GPUs); the
    folders and the model must be at the same paths on every node."""
    import time

    ray = None
    if use_ray or ray_address or ray_encoders:
        from indexer.ray_runner import RayOptions

        ray = RayOptions(address=ray_address, encoders=ray_encoders, batch_size=ray_batch_size)
    engine = _open(ctx, model=model, create=True)
    bar = None
    state = {"t0": time.time(), "done": 0}

    def on_total(n):
        nonlocal bar
        if not quiet and n:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc="embedding", unit="img", file=sys.stderr, dynamic_ncols=True)

    def progress(n):
        state["done"] += n
        if bar:
            bar.update(n)

    def on_skip(path, reason):
        if not quiet:
            msg = f"skipped {_shown(str(path))}: {reason}"
            (bar.write(msg, file=sys.stderr) if bar else click.echo(msg, err=True))

    try:
        summary = engine.index(paths, on_skip=on_skip, progress=progress, on_total=on_total,
                               batch_size=batch_size, threads=threads, processes=processes, prune=prune, ray=ray)
    except KeyboardInterrupt:
        if bar:
            bar.close()
        click.echo(f"interrupted: {engine.store.count_images()} images in {engine.index_dir} are kept; "
                   "run the same command again to index the rest", err=True)
        ctx.exit(130)
    finally:  # an error message then starts on a line of its own
        if bar:
            bar.close()
    d = summary.to_dict()
    rate = summary.embedded / summary.seconds if summary.seconds else 0.0
    skipped = ", ".join(f"{n} {r}" for r, n in sorted(d["skipped"].items())) or "none"
    click.echo(f"added {d['added']}, updated {d['updated']}, moved {d['moved']}, removed {d['removed']}, "
               f"unchanged {d['unchanged']}; skipped: {skipped}")
    if d["offline"]:
        folders = sorted(d["offline_folders"])
        shown = ", ".join(_shown(f) for f in folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
        click.echo(f"offline: kept {d['offline']} images whose folder is missing, empty or unreadable ({shown}); "
                   "reconnect it and index again, or remove them with: xmr index --prune "
                   + " ".join(_shown(p) for p in paths), err=True)
    speed = f"{rate:.1f} images/s embedded" if summary.embedded else "nothing to embed"
    if ray is not None:
        speed += f" on a {summary.runner}"
    click.echo(f"{engine.store.count_images()} images in {engine.index_dir} ({speed}, {summary.seconds:.1f} s)")


@cli.command()
@click.argument("query")
@click.option("-k", type=click.IntRange(1, 1000), default=10, show_default=True, help="Number of results.")
@click.option("--no-rerank", is_flag=True, help="FAISS recall only, skip the cross-attention reranker.")
@click.option("--rerank-k", type=click.IntRange(0, 1000), default=None,
              help="How many recalled images to rerank [default: the model's: 20, or 0 where its reranker "
                   "measured no gain over recall].")
@click.option("--reranker", default=None, help="Another reranker: a Hugging Face BLIP ITM name or folder.")
@click.option("--under", type=click.Path(file_okay=False), default=None, help="Only images below this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
@click.pass_context
def search(ctx, query, k, no_rerank, rerank_k, reranker, under, as_json):
    """Find images matching a text."""
    engine = _open(ctx, rerank=not no_rerank, reranker=reranker)
    hits = engine.search(query, k=k, rerank=not no_rerank, rerank_k=rerank_k, under=under)
    _emit_json([h.to_dict() for h in hits]) if as_json else _print_images(hits, engine, under)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--under", type=click.Path(file_okay=False), default=None, help="Only images below this folder.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def similar(ctx, image, k, under, as_json):
    """Find images similar to IMAGE (indexed or not)."""
    engine = _open(ctx, rerank=False)
    hits = engine.similar(image, k=k, under=under)
    _emit_json([h.to_dict() for h in hits]) if as_json else _print_images(hits, engine, under)


MAX_LABEL = 200  # characters: a longer line is not a label


@cli.group()
def captions():
    """Manage the caption collection."""


@captions.command("labels")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--template", "templates", multiple=True,
              help='A prompt with {} for the label (repeat to average several). Default: "a photo of a {}."')
@click.pass_context
def captions_labels(ctx, file, templates):
    """Import a label list (one label a line) as captions, for tagging photos.

    Each label becomes one caption, the mean of its prompts, as zero-shot
    classifiers are built; `xmr caption PHOTO` then names its best labels.
    Blank lines and lines starting with # are skipped.
    """
    from .engine import DEFAULT_TEMPLATES

    labels, bad = [], 0
    with open(file, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            label = line.strip()
            if not label or label.startswith("#"):
                continue
            if len(label) > MAX_LABEL or "\ufffd" in label:
                bad += 1
                if bad <= 20:
                    click.echo(f"skipped line {n}: not a label (too long, or not UTF-8)", err=True)
                continue
            labels.append(label)
    engine = _open(ctx.parent, create=True, rerank=False)
    result = engine.import_labels(labels, templates or DEFAULT_TEMPLATES, source=f"labels:{Path(file).resolve()}")
    click.echo(f"imported {result['imported']} labels ({result['duplicates']} already there, {bad} lines skipped, "
               f"{result['templates']} template(s)); {result['total']} captions in the collection")


@captions.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["auto", "flickr", "karpathy", "csv", "text"]), default="auto",
              show_default=True)
@click.pass_context
def captions_import(ctx, file, fmt):
    """Import captions: Flickr8k token file, Karpathy JSON, CSV (image,caption) or text."""
    engine = _open(ctx.parent, create=True, rerank=False)
    shown = [0]

    def on_bad(where, reason):
        shown[0] += 1
        if shown[0] <= 20:
            click.echo(f"skipped {where}: {_shown(reason)}", err=True)

    bar = None

    def on_total(n):
        nonlocal bar
        if n:
            bar = _progress("importing captions", n, unit="caption")

    try:
        result = engine.import_captions(file, fmt, on_bad, progress=lambda n: bar.update(n) if bar else None,
                                        on_total=on_total)
    finally:  # an error message then starts on a line of its own
        if bar:
            bar.close()
    click.echo(f"imported {result['imported']} captions ({result['duplicates']} already there, "
               f"{result['malformed']} malformed entries skipped); {result['total']} in the collection")
    if result["not_utf8"]:
        click.echo(f"warning: {result['not_utf8']} captions of {_shown(file)} hold bytes that are not UTF-8, "
                   "imported with \ufffd in their place; save the file as UTF-8 for the exact text", err=True)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-k", type=click.IntRange(1, 1000), default=5, show_default=True)
@click.option("--no-rerank", is_flag=True, help="FAISS recall only, skip the cross-attention reranker.")
@click.option("--rerank-k", type=click.IntRange(0, 1000), default=None,
              help="How many recalled captions to rerank [default: the model's: 20, or 0 where its reranker "
                   "measured no gain over recall].")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def caption(ctx, image, k, no_rerank, rerank_k, as_json):
    """Best captions for IMAGE (any image file, indexed or not)."""
    engine = _open(ctx, rerank=not no_rerank)
    hits = engine.caption(image, k=k, rerank=not no_rerank, rerank_k=rerank_k)
    if as_json:
        _emit_json([h.to_dict() for h in hits])
        return
    for h in hits:
        click.echo(f"{h.rank:>4}  {h.score:>8.4f}{'*' if h.reranked else ' '} {_shown(h.caption)}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.pass_context
def remove(ctx, paths):
    """Remove images (files, or everything below folders) from the index."""
    engine = _open(ctx, rerank=False)
    n = engine.remove(paths)
    click.echo(f"removed {n} images; {engine.store.count_images()} left")


@cli.command()
@click.pass_context
def upgrade(ctx):
    """Bring an index made with an earlier version of its model up to date.

    Possible where only the model's text side changed (text tower, query bank,
    text memory): captions are embedded again and image scores recomputed from
    the stored vectors; no image file is read. One transaction: an interrupted
    upgrade leaves the index as it was. Otherwise xmr says to rebuild."""
    engine = _open(ctx, rerank=False, upgrade=True)
    bar = None

    def on_total(n):
        nonlocal bar
        bar = _progress("upgrading", n, unit="item")

    result = engine.upgrade(progress=lambda n: bar.update(n) if bar else None, on_total=on_total)
    if bar:
        bar.close()
    if not result["upgraded"]:
        click.echo(f"the index in {engine.index_dir} is up to date ({engine.encoder.name} {result['to']})")
        return
    click.echo(f"upgraded the index in {engine.index_dir} from {result['from']} to {result['to']}: "
               f"{result['captions']} captions embedded again, {result['images']} images re-scored")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx, as_json):
    """What the index holds and where it lives."""
    from indexer.database import index_exists

    index_dir = ctx.obj["index_dir"]
    if not index_exists(Path(index_dir)):
        info = {"index_dir": str(index_dir), "images": 0, "captions": 0, "model": None, "dim": None,
                "index_type": None, "exists": False}
    else:
        info = _open(ctx, rerank=True, upgrade=True).status()
        info["exists"] = True
    if as_json:
        _emit_json(info)
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:<{width}}  {value}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it to the network).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.pass_context
def serve(ctx, host, port):
    """Serve the JSON API and the search page."""
    import socket

    import uvicorn

    from .server import create_app

    engine = _open(ctx, rerank=True)
    try:  # bind here, so a taken port is one clear line before anything claims to serve
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise click.ClickException(f"cannot listen on {host}:{port} ({reason}); "
                                   "choose another --port (or --host)") from None
    click.echo(f"xmr serving {engine.index_dir} on http://{host}:{port}/ (API docs at /docs)", err=True)
    uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning")).run(sockets=[sock])


@cli.command("eval")
@click.option("--dataset", type=click.Path(exists=True), help="Flickr8k folder or Karpathy JSON (image <-> caption recall).")
@click.option("--classes", "classes_dir", type=click.Path(exists=True, file_okay=False),
              help="A folder with one sub-folder of images per class (zero-shot classification).")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Image folder of a JSON dataset.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "dev", "test"]))
@click.option("--template", "templates", multiple=True,
              help='With --classes: a prompt with {} for the class name (repeat to average several). '
                   'Default: "a photo of a {}."')
@click.option("--model", default=None, help="Encoder to evaluate (default: the default model).")
@click.option("--no-rerank", is_flag=True)
@click.option("--rerank-k", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N images of the split.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def eval_cmd(ctx, dataset, classes_dir, images, split, templates, model, no_rerank, rerank_k, limit, as_json):
    """Measure search quality through the real engine (temporary index).

    \b
    --dataset: Recall@1/5/10 image -> text and text -> image on a split.
    --classes: zero-shot classification; each class folder's name (_ read as
    a space) becomes a caption, image -> caption picks the class. Reports
    top-1 and top-5 accuracy and text -> image precision at the class size.
    """
    if (dataset is None) == (classes_dir is None):
        raise click.UsageError("give exactly one of --dataset (caption recall) or --classes (zero-shot classes)")
    _quiet_transformers()
    progress = None if as_json else _progress
    if classes_dir is not None:
        from .engine import DEFAULT_TEMPLATES
        from .zeroshot import evaluate_classes

        result = evaluate_classes(classes_dir, model=model, templates=templates or DEFAULT_TEMPLATES,
                                  rerank_ks=(0 if no_rerank else rerank_k,), progress=progress)[0]
        if as_json:
            _emit_json(result)
            return
        click.echo(f"{result['classes']} classes, {result['images']} images ({result['skipped']} skipped), "
                   f"{result['templates']} template(s)")
        click.echo(f"top-1 {result['top1']:.1f}  top-5 {result['top5']:.1f}  "
                   f"text->image precision {result['text_precision']:.1f}")
        click.echo(f"(rerank_k={result['rerank_k']}, {result['seconds']:.0f} s)")
        return
    if templates:
        raise click.UsageError("--template goes with --classes")
    from .evaluation import evaluate

    result = evaluate(dataset, images, split, model=model, rerank=not no_rerank, rerank_k=rerank_k,
                      limit=limit, progress=progress)
    if as_json:
        _emit_json(result)
        return
    click.echo(f"{'':8}{'R@1':>8}{'R@5':>8}{'R@10':>8}")
    for d in ("i2t", "t2i"):
        r = result[d]
        click.echo(f"{d:8}{r['R@1']:>8.1f}{r['R@5']:>8.1f}{r['R@10']:>8.1f}")
    click.echo(f"rsum {result['rsum']:.1f}  (rerank_k={result['rerank_k']}, {result['seconds']:.0f} s)")


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
@click.option("--stages", default="dual,rerank,int8,views,retune,text_head", show_default=True,
              help="Comma-separated, run in this order: dual, rerank, int8 (the quantized CPU image graph), "
                   "views (the test-time views of an image, chosen on dev, with their query bank), "
                   "retune (the reranker retuned on the engine's features, as `xmr retune-reranker`), "
                   "text_head (the text head retuned against the image side, as `xmr retune-text-head`).")
@click.option("--resume", type=click.Path(exists=True, file_okay=False), help="Start from this checkpoint's dual encoder.")
@click.option("--epochs", type=int, default=15, show_default=True, help="Dual-encoder epochs (over all captions).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--lr-image", type=float, default=2e-4, show_default=True)
@click.option("--lr-text", type=float, default=2e-5, show_default=True)
@click.option("--freeze-image-tower", is_flag=True, help="Train only heads and text layers.")
@click.option("--rerank-epochs", type=int, default=6, show_default=True)
@click.option("--rerank-width", type=int, default=256, show_default=True)
@click.option("--rerank-layers", type=int, default=2, show_default=True)
@click.option("--retune-epochs", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Epochs of the retune stage.")
@click.option("--text-head-epochs", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Epochs of the text_head stage.")
@click.option("--ablations", default="",
              help="Comma-separated reranker ablations: no_region,no_word,no_global,one_way,random_neg.")
@click.option("--limit", type=int, default=None, help="Use only the first N images of each split (smoke tests).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=8, show_default=True, help="Image decoding threads.")
def train(dataset, images, out_dir, image_tower, image_size, embed_dim, text_layers, stages, resume, epochs,
          batch_size, lr_image, lr_text, freeze_image_tower, rerank_epochs, rerank_width, rerank_layers,
          retune_epochs, text_head_epochs, ablations, limit, device, seed, threads):
    """Train the dual encoder and the reranker on a dataset's train split
    (dev selects), then choose the image views and retune both on what the
    engine itself computes (see --stages)."""
    from .training.dual import DualTrainOptions
    from .training.rerank import RerankTrainOptions
    from .training.retune import RetuneOptions
    from .training.run import TrainJob, run_training
    from .training.text_head import HeadOptions

    job = TrainJob(
        dataset=dataset, images=images, out_dir=out_dir, image_tower=image_tower, image_size=image_size,
        embed_dim=embed_dim, text_trainable_layers=text_layers,
        stages=tuple(s for s in stages.split(",") if s), resume=resume,
        ablations=tuple(a for a in ablations.split(",") if a), limit=limit, device=device, threads=threads,
        dual=DualTrainOptions(epochs=epochs, batch_size=batch_size, lr_image=lr_image, lr_text=lr_text,
                              train_image_tower=not freeze_image_tower, seed=seed),
        rerank=RerankTrainOptions(epochs=rerank_epochs, seed=seed),
        retune=RetuneOptions(epochs=retune_epochs, seed=seed), text_head=HeadOptions(epochs=text_head_epochs, seed=seed),
        reranker_width=rerank_width, reranker_layers=rerank_layers,
    )
    try:
        report = run_training(job, _progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    summary = {"dual_dev": report.get("dual_dev"), "dual_test": report.get("dual_test")}
    for name, entry in report.get("rerank", {}).items():
        summary[f"rerank_{name}"] = {s: {k: round(v["rsum"], 1) for k, v in entry.get(s, {}).items()} for s in ("dev", "test")}
    if "views" in report:
        summary["views"] = {"chosen": report["views"]["chosen"], "dev_rsum": round(report["views"]["dev_after"]["rsum"], 1)}
    for stage in ("retune", "text_head"):
        if stage in report:
            summary[stage] = {"dev_rsum": [round(report[stage][k]["rsum"], 1) for k in ("dev_before", "dev_after")],
                              "best_epoch": report[stage]["best_epoch"]}
    click.echo(json.dumps(summary, indent=2))


def _cached_feature_options(chooses: str):
    """The options of the commands that train heads on cached tower features
    (dataset, output folder, feature cache, extra captions, class sets);
    ``chooses``: what the --classes sets take part in choosing."""
    options = [
        click.option("--dataset", required=True, type=click.Path(exists=True), help="Flickr8k folder or Karpathy JSON."),
        click.option("--images", type=click.Path(exists=True, file_okay=False), help="Image folder of a JSON dataset."),
        click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
                     help="New checkpoint folder to write."),
        click.option("--cache", "cache_dir", default="runs/feature-cache", show_default=True,
                     type=click.Path(file_okay=False), help="Where tower features are kept between runs."),
        click.option("--extra-captions", multiple=True, type=click.Path(exists=True, dir_okay=False),
                     help="CSV (image,caption) of more captions of the train images, matched by name or Flickr id."),
        click.option("--classes", "class_sets", multiple=True, type=click.Path(exists=True, file_okay=False),
                     help=f"Labelled dev folder (one sub-folder per class) that takes part in choosing {chooses}."),
    ]

    def wrap(f):
        for option in reversed(options):
            f = option(f)
        return f

    return wrap


@cli.command("wise-ft")
@click.argument("model")
@_cached_feature_options("the channel's gain")
@click.option("--alpha", type=click.FloatRange(0.0, 1.0), default=0.5, show_default=True,
              help="Weight of the fine-tuned tower against the pretrained one.")
@click.option("--gains", default="0,0.3,0.5,0.8", show_default=True, help="Class-channel gains to choose from.")
@click.option("--temperatures", default="1", show_default=True, help="Class softmax temperatures to choose from.")
@click.option("--epochs", type=click.IntRange(1, 100), default=2, show_default=True, help="Image-head epochs.")
def wise_ft(model, dataset, images, out_dir, alpha, cache_dir, extra_captions, class_sets, gains, temperatures,
            epochs):
    """Give a fine-tuned model back what its image tower knew (WiSE-FT).

    The image tower moves towards its pretrained weights (--alpha), the image
    head is retrained against the model's unchanged text side, and the
    tower's ImageNet classifier joins as a class channel whose gain is
    chosen on dev (Flickr8k dev and the --classes sets). Then run
    `xmr quantize` on the new folder for the int8 image graph.
    """
    from .encoders import resolve_model
    from .training.wise import WiseJob, WiseOptions, run

    def floats(text):
        try:
            return tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise click.BadParameter(f"{text!r}: give comma-separated numbers") from None

    kind, location = resolve_model(model)
    if kind != "xmr":
        raise click.BadParameter(f"{model} is not an xmr checkpoint (a built-in model name or a checkpoint folder)")
    job = WiseJob(model_dir=str(location), dataset=dataset, images=images, out_dir=out_dir, cache_dir=cache_dir,
                  extra_captions=list(extra_captions), class_sets=list(class_sets),
                  options=WiseOptions(alpha=alpha, epochs=epochs, gains=floats(gains) or (0.0,),
                                      temperatures=floats(temperatures) or (1.0,)))
    try:
        report = run(job, _progress)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    chosen = report["chosen"]
    click.echo(f"gain {chosen['gain']}, temperature {chosen['temperature']}: dev rsum {chosen['dev_rsum']}"
               + (f", zero-shot mean {chosen['zeroshot_mean']}" if "zeroshot_mean" in chosen else "")
               + f"; wrote {out_dir} (next: xmr quantize {out_dir} --dataset {dataset})")


@cli.command("train-heads")
@_cached_feature_options("the epoch")
@click.option("--image-tower", default="efficientnet-lite2", show_default=True,
              type=click.Choice(["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]))
@click.option("--image-head-hidden", type=click.IntRange(0, 8192), default=1024, show_default=True,
              help="Width of the residual MLP beside the linear image head (0: linear only).")
@click.option("--text-head-hidden", type=click.IntRange(0, 8192), default=0, show_default=True)
@click.option("--no-imagenet-channel", is_flag=True, help="Leave out the ImageNet classifier channel.")
@click.option("--epochs", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N images of each split (smoke tests).")
@click.option("--seed", type=int, default=0, show_default=True)
def train_heads(dataset, images, out_dir, cache_dir, extra_captions, class_sets, image_tower, image_head_hidden,
                text_head_hidden, no_imagenet_channel, epochs, lr, limit, seed):
    """Train a model whose towers stay as pretrained (only the heads learn).

    Tower features are computed once (kept in --cache), so this runs on a
    CPU in minutes, and the towers keep what they know: the image tower its
    ImageNet training, the text tower its sentence training. The epoch is
    chosen on dev: Flickr8k dev recall plus the mean top-1 of the --classes
    sets.
    """
    from .training.heads_job import HeadsJob, run
    from .training.locked import HeadOptions

    job = HeadsJob(dataset=dataset, images=images, out_dir=out_dir, cache_dir=cache_dir,
                   extra_captions=list(extra_captions), class_sets=list(class_sets), image_tower=image_tower,
                   image_head_hidden=image_head_hidden, text_head_hidden=text_head_hidden,
                   imagenet_channel=not no_imagenet_channel, limit=limit,
                   options=HeadOptions(epochs=epochs, lr=lr, seed=seed))

    def said(e):
        click.echo(f"epoch {e['epoch']}: loss {e['loss']}, dev rsum {e['dev_rsum']}"
                   + (f", zero-shot mean {e['zeroshot_mean']}" if "zeroshot_mean" in e else ""), err=True)

    report = run(job, _progress, on_epoch=said)
    best = report["dev"]
    click.echo(f"best epoch {report['best_epoch']}: dev rsum {best['dev_rsum']}"
               + (f", zero-shot mean {best['zeroshot_mean']}" if "zeroshot_mean" in best else "")
               + f"; wrote {out_dir}")


@cli.command()
@click.argument("model")
@click.option("--dataset", required=True, type=click.Path(exists=True),
              help="Flickr8k-layout folder or Karpathy-split JSON: train images calibrate, dev images check.")
@click.option("--images", type=click.Path(exists=True, file_okay=False), help="Image folder (for a JSON dataset).")
@click.option("--calibration", type=click.IntRange(2, 10000), default=256, show_default=True,
              help="Training images whose activations set the int8 ranges.")
@click.option("--keep-float-convs", type=click.IntRange(0, 1000), default=8, show_default=True,
              help="Leading convolutions left in float (the stem and first blocks carry most of the error).")
def quantize(model, dataset, images, calibration, keep_float_convs):
    """Make MODEL's int8 image graph for fast CPU indexing.

    MODEL is a checkpoint folder or a shipped model name; the graph
    (image-int8.onnx) is written into it and used automatically on CPUs
    while the weights stay the same (XMR_BACKEND=onnx turns it off).
    """
    from .encoders import resolve_model
    from .training.quantize import quantize_from_dataset

    kind, location = resolve_model(model)
    if kind != "xmr":
        raise click.ClickException(f"{model}: only xmr checkpoints can be quantized (give the checkpoint, not a variant)")
    try:
        info = quantize_from_dataset(location, dataset, images, calibration, keep_float_convs=keep_float_convs)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(info, indent=2))
    if not info["kept"]:
        raise click.ClickException("the int8 graph disagreed with fp32 and was not kept; "
                                   "try a larger --keep-float-convs")


def _retuning_command(name: str):
    """A command that retunes part of a checkpoint: the options they all take
    (the dataset whose train split retunes and dev split selects, the new
    folder, a limit), around the command's own options."""
    shared_front = [
        click.argument("model"),
        click.option("--dataset", required=True, type=click.Path(exists=True),
                     help="Flickr8k-layout folder or Karpathy-split JSON: train retunes, dev selects."),
        click.option("--images", type=click.Path(exists=True, file_okay=False),
                     help="Image folder (for a JSON dataset)."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="New checkpoint folder to write."),
    ]
    limit = click.option("--limit", type=click.IntRange(2, None), default=None,
                         help="Use only the first N images of each split.")

    def wrap(f):
        f = limit(f)
        for deco in reversed(shared_front):
            f = deco(f)
        return cli.command(name)(f)

    return wrap


def _run_retuning(model: str, what: str, run) -> None:
    """Run ``run(checkpoint folder)`` for an xmr checkpoint named by ``model``
    and print its summary; ``what`` names the part a variant or another kind
    of model lacks."""
    from .encoders import resolve_model
    from .errors import CheckpointError

    kind, location = resolve_model(model)
    if kind != "xmr":
        raise click.ClickException(f"{model}: only xmr checkpoints have {what} (give the checkpoint, not a variant)")
    try:
        info = run(location)
    except (ValueError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(info, indent=2))


@_retuning_command("retune-reranker")
@click.option("--epochs", type=click.IntRange(1, 100), default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--pool", type=click.IntRange(4, 100000), default=256, show_default=True,
              help="Negatives are drawn from each query's top POOL wrong candidates by the engine's recall scores.")
@click.option("--reranker-from", default=None,
              help="Start from this model's reranker (a shipped name or a checkpoint folder with the same image tower and "
                   "embedding size), e.g. for a model that has none.")
@click.option("--crossfit-folds", type=click.IntRange(0, 50), default=0, show_default=True,
              help="Train on cross-fitted image embeddings: each train image embedded by an image head trained "
                   "without its fold (0: the model's own embeddings).")
@click.option("--captions-per-image", type=click.IntRange(1, 100), default=None,
              help="Captions of each train image an epoch visits [default: all].")
def retune_reranker(model, dataset, images, out, epochs, lr, pool, reranker_from, crossfit_folds,
                    captions_per_image, limit):
    """Retune MODEL's reranker on the features the engine uses (its views,
    stored region tokens, query-bank corrected recall), writing a copy of the
    checkpoint with the new reranker to --out. The region projection stays
    fixed: indexes keep their stored tokens, but a changed checkpoint is a new
    model version (index with --model OUT; `xmr quantize OUT` makes its int8
    image graph again).
    """
    from .training.retune import RetuneOptions, retune_checkpoint

    if reranker_from is not None:
        from .encoders import resolve_model

        kind, reranker_from = resolve_model(reranker_from)
        if kind != "xmr":
            raise click.ClickException("--reranker-from takes an xmr checkpoint")
    opts = RetuneOptions(epochs=epochs, lr=lr, pool=pool, captions_per_image=captions_per_image)
    _run_retuning(model, "our reranker", lambda location: retune_checkpoint(
        location, out, dataset, images, opts, limit=limit, progress_factory=_progress,
        reranker_from=reranker_from, folds=crossfit_folds))


@_retuning_command("retune-text-head")
@click.option("--epochs", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--crops", type=click.IntRange(1, 64), default=6, show_default=True,
              help="Random crops of each train image to learn against.")
def retune_text_head(model, dataset, images, out, epochs, lr, crops, limit):
    """Retune MODEL's text head against its fixed image side (random crops of
    the train images as targets, the engine's text memory in the loop),
    writing a copy of the checkpoint with the new head and query bank to
    --out. Image vectors and region tokens stay valid: indexes built with
    MODEL are brought up to the new model by `xmr upgrade`.
    """
    from .training.text_head import HeadOptions, retune_text_head_checkpoint

    _run_retuning(model, "a text head to retune", lambda location: retune_text_head_checkpoint(
        location, out, dataset, images, HeadOptions(epochs=epochs, lr=lr, crops=crops), limit=limit,
        progress_factory=_progress))


def main() -> None:
    cli(prog_name="xmr")


if __name__ == "__main__":
    main()
