"""`ktransfer precompute`: frozen models' logits on every augmented view of the transfer data, cached once."""

from __future__ import annotations

from pathlib import Path

import click

from .group import main
from .data_options import data_options, load_cli_data
from .options import data_dir_option


@main.command("precompute")
@click.option("--model", "models", required=True, multiple=True, help="A frozen model to cache (a teacher, or a student as the original of its own transfers); repeat for each.")
@click.option("--student", "students", required=True, multiple=True, help="A student that will train on the views: its input frame (size, crop) shapes them. Repeat for students with other frames.")
@click.option("--augment", type=click.Choice(["paper"]), default="paper", show_default=True, help="The augmentation recipe of the transfers.")
@click.option("--seed", "seeds", type=int, multiple=True, help="The transfers' seed (the views follow it); repeat for several.  [default: 0]")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Epochs to cache; a longer transfer later adds the missing ones.")
@click.option("--cache-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="float32 reproduces online targets exactly; float16 takes half the disk (rounding of the targets only).")
@click.option("--cache-top-k", "top_k", type=click.IntRange(min=0), default=0, show_default=True, metavar="K", help="Keep only each view's K largest logits with their classes (about C/(2K) times less disk in float16); transfers read them with the same --cache-top-k K.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="The prediction cache folder (default: $KTRANSFER_CACHE/predictions, where transfers look).")
@click.option("--check", "check_samples", type=click.IntRange(min=1), default=None, metavar="N", help="Also recompute N random cached entries per epoch and compare them with the stored ones.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="Where the models run: cpu, cuda, cuda:N or mps.")
@data_dir_option
@data_options
def precompute_command(models, students, augment, seeds, epochs, cache_dtype, top_k, cache_dir, check_samples, batch_size, device, data_dir, **data):
    """Cache frozen models' logits on the exact augmented views of the transfer data.

    Transfers with --targets views (and studies with targets: views) then read them instead of running
    the models every step: a study of N students and M teachers runs each teacher once per epoch, not
    once per student. The first such transfer builds what is missing itself; this command builds ahead
    (on a bigger machine, say) and --check verifies a cache. See docs/performance.md.

    Example: ktransfer precompute --model zoo:vit --model zoo:cnn --student zoo:cnn --epochs 3
    """
    from ..engine import check_device
    from ..models import load_model
    from ..predictions import PredictionCache
    from ..view_cache import ViewCache, ViewCacheError

    check_device(device)
    frozen = {spec: load_model(spec, data_dir=data_dir) for spec in dict.fromkeys(models)}
    trained = {spec: frozen.get(spec) or load_model(spec, data_dir=data_dir) for spec in dict.fromkeys(students)}
    transfer_set, _ = load_cli_data([*trained.values(), *frozen.values()], None, data_dir, **data)
    root = PredictionCache(cache_dir).root
    built, total_bytes, failed = 0, 0, []
    for student_spec, student in trained.items():
        for seed in seeds or (0,):
            for spec, model in frozen.items():
                cache = ViewCache(root, model, transfer_set, student.preprocess, augment, seed, cache_dtype, top_k)
                for epoch in range(epochs):
                    if cache.build(epoch, batch_size, device):
                        built += 1
                        click.echo(f"{spec}: epoch {epoch + 1}/{epochs} of the views for {student_spec} (seed {seed}) cached")
                if check_samples is not None:
                    for epoch, result in cache.check(check_samples, list(range(epochs)), device=device).items():
                        if not result["ok"]:
                            failed.append(f"{spec} epoch {epoch + 1} (largest difference {result['max_abs_difference']:.3g})")
                total_bytes += cache.nbytes()
    click.echo(f"{built} shards built; the caches take {total_bytes / 2**20:.1f} MiB in {root / 'views'}")
    if check_samples is not None:
        if failed:
            raise ViewCacheError(f"cached entries differ from the models' outputs: {', '.join(failed)}; delete those folders under {root / 'views'} and precompute again")
        click.echo(f"all checked entries match ({check_samples} per epoch and model)")
