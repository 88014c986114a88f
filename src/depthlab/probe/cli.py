"""`depthlab diagnose MODEL`: every layer-effectiveness metric on one model, one command."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from depthlab.errors import DepthlabError
from depthlab.text import counted, fmt_params


def register(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose_command)


def _options(opt: list[str] | None) -> dict[str, dict]:
    from depthlab.probe.diagnose import parse_option

    options: dict[str, dict] = {}
    for text in opt or []:
        metric, key, value = parse_option(text)
        options.setdefault(metric, {})[key] = value
    return options


def diagnose_command(
    model: Annotated[str, typer.Argument(
        help="A depthlab run or checkpoint dir, a Hugging Face model dir, a .gguf file, "
             "'smollm2' (the shipped SmolLM2-135M GGUF) or a hub id.")],
    metrics: Annotated[str, typer.Option(
        help="'all' or a comma-separated list: variance, jacobian, usefulness, causal, "
             "permutation, layer_drop, block_influence, angular_distance, layer_similarity, "
             "weight_sparsity, attention_sparsity, moe.")] = "all",
    data: Annotated[str, typer.Option(
        help="'auto' (a depthlab run's own corpus, else kjv), 'kjv', a text/JSONL file or "
             "folder, or a prepared token directory. Its validation split is used.")] = "auto",
    samples: Annotated[int, typer.Option("--samples", "-n",
                                         help="N: sequences sampled.")] = 16,
    seq_len: Annotated[int, typer.Option("--seq-len", "-t", help="T: tokens per sequence.")] = 128,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output directory (default: RUN/diagnose for a depthlab run, "
                            "else runs/diagnose/<model>).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward chunk.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the sequence sample.")] = 0,
    dtype: Annotated[str, typer.Option(
        help="auto (as stored; GGUF dequantized to fp32), fp32, bf16, fp16 or fp64. Reductions are "
             "fp32/fp64 whatever the model runs in.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    opt: Annotated[list[str] | None, typer.Option(
        "--opt", help="Metric option METRIC.KEY=VALUE (repeatable), e.g. "
                      "permutation.pairs=adjacent, jacobian.mode=hutchinson, "
                      "jacobian.samples=2 (any metric: run on the first K sequences).")] = None,
    figures: Annotated[bool, typer.Option("--figures/--no-figures",
                                          help="Write PNG figures.")] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress",
                                           help="Show per-metric progress.")] = True,
) -> None:
    """Measure how much each layer of MODEL does: writes results.json, CSVs and figures."""
    from rich.console import Console
    from rich.table import Table

    from depthlab.probe.diagnose import default_out_dir, diagnose
    from depthlab.probe.results import dtype_label, headline_rows, result_warnings

    console = Console(soft_wrap=True)
    if not console.is_terminal:  # piped / redirected: room for the whole table
        console = Console(width=120, soft_wrap=True)
    err_console = Console(stderr=True, soft_wrap=True)
    if samples < 1:
        raise DepthlabError(f"--samples must be >= 1, got {samples}")
    if seq_len < 2:
        raise DepthlabError(f"--seq-len must be >= 2, got {seq_len}")
    options = _options(opt)
    out_dir = out if out is not None else default_out_dir(model)
    argv = ["depthlab", "diagnose", model, "--metrics", metrics, "--data", data, "--samples",
            str(samples), "--seq-len", str(seq_len), "--out", str(out_dir), "--batch-size",
            str(batch_size), "--seed", str(seed), "--dtype", dtype, "--device", device]
    for text in opt or []:
        argv += ["--opt", text]
    command = shlex.join(argv)

    def log(msg: str) -> None:
        if progress:
            err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
    replaces = (Path(out_dir) / "results.json").is_file()
    results = diagnose(
        model, metrics=metrics, out=out_dir, data=data, samples=samples, seq_len=seq_len,
        seed=seed, batch_size=batch_size, dtype=dtype, device=device, options=options,
        figures=figures, progress=progress, console=err_console, command=command, log=log,
    )

    if replaces:
        err_console.print(f"note: replaced the earlier diagnosis in {out_dir}", highlight=False,
                          markup=False, soft_wrap=True)
    m, d = results["model"], results["data"]
    table = Table(title=f"{results['model_name']}: {m['arch']}, L={m['n_layers']}, "
                        f"d={m['d_model']}, {fmt_params(m['params'])} params, {dtype_label(m)}; "
                        f"N={d['n_samples']} x T={d['seq_len']} of {d['source']}")
    table.add_column("metric", no_wrap=True)
    table.add_column("headline", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("block fwd", justify="right")
    for row in headline_rows(results):
        bf = row["block_forwards"]
        bf_s = f"{bf:,}" if isinstance(bf, int) else "–"
        if row["jvp_block_forwards"]:
            bf_s += f"\n+{row['jvp_block_forwards']:,} JVP"
        n = row["n_samples"]
        name = row["metric"] + (f" (N={n})" if n != d["n_samples"] else "")
        secs = f"{row['seconds']:.1f}" if isinstance(row["seconds"], (int, float)) else "–"
        pairs = row["values"] or [("–", "–")]
        for i, (label, value) in enumerate(pairs):
            first = i == 0
            table.add_row(name if first else "", label, value, secs if first else "",
                          bf_s if first else "", end_section=i == len(pairs) - 1)
    for name, why in results["skipped"].items():
        table.add_row(name, "skipped", why, "", "")
    console.print(table)
    for warning in result_warnings(results):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    run = results["run"]
    console.print(f"total {run['total_seconds']:.1f}s (load {run['load_seconds']:.1f}s, data "
                  f"{run['data_seconds']:.1f}s)")
    outs = results.get("outputs", {})
    console.print(f"results: [bold]{outs.get('results')}[/]  summary: {outs.get('summary')}\n"
                  f"  csv: {counted(len(outs.get('csv', [])), 'file')} in {out_dir / 'csv'}  figures: "
                  f"{len(outs.get('figures', []))} in {out_dir / 'figures'}", highlight=False)
