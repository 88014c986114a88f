"""`depthlab export`, `depthlab import-hf` and `depthlab eval` (registered by depthlab.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from depthlab.errors import DepthlabError
from depthlab.text import counted

console = Console(soft_wrap=True)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def export(
    source: Annotated[Path, typer.Argument(help="A run directory (latest checkpoint) or a "
                                                "checkpoint directory.")],
    out_dir: Annotated[Path, typer.Argument(help="Output directory.")],
    to: Annotated[str, typer.Option("--to", help="Export format (hf).")] = "hf",
    arch: Annotated[str, typer.Option(help="Target architecture: auto, llama, qwen3, glm4, "
                                           "mixtral, qwen3_moe, qwen2_moe.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Saved weight dtype: float32, bfloat16, "
                                            "float16.")] = "float32",
    verify: Annotated[bool, typer.Option(help="Check the stock model's logits against "
                                              "DepthLM before writing.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export.")] = False,
) -> None:
    """Write RUN_OR_CKPT as a stock transformers checkpoint (safetensors + config + tokenizer)."""
    from depthlab.interop.hf_export import export_hf

    if to.lower() not in ("hf", "huggingface", "transformers"):
        raise DepthlabError(f"--to {to}: only 'hf' (Hugging Face transformers) is supported")
    _quiet_transformers()
    r = export_hf(source, out_dir, arch=arch, dtype=dtype, verify=verify, overwrite=overwrite)
    diff = f"{r.max_abs_diff:.2g}" if r.max_abs_diff is not None else "not checked"
    console.print(f"exported [bold]{source}[/] (step {r.step}) -> [bold]{r.out_dir}[/] as "
                  f"{r.hf_class} ({r.arch}); tokenizer {r.tokenizer}; max |dlogit| {diff}")
    for note in r.notes:
        console.print(f"  note: {note}")
    console.print(f"  load: AutoModelForCausalLM.from_pretrained({str(r.out_dir)!r})")


def import_hf_cmd(
    hf_dir: Annotated[str, typer.Argument(help="Hugging Face model dir (or hub id).")],
    out_run_dir: Annotated[Path, typer.Argument(help="Run directory to write.")],
    keep_layers: Annotated[str | None, typer.Option(help="HF layers to keep, in order, e.g. "
                                                         "0-5,8 (default: all).")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="Override the max sequence length "
                                                         "(RoPE table size).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run config.")] = False,
) -> None:
    """Load a Llama-family HF checkpoint into a depthlab run dir (step 0, no optimizer)."""
    from depthlab.interop.hf_import import import_hf_to_run, parse_layers

    if max_seq_len is not None and max_seq_len < 1:
        raise DepthlabError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    _quiet_transformers()
    out, mcfg = import_hf_to_run(hf_dir, out_run_dir, parse_layers(keep_layers), max_seq_len,
                                 overwrite)
    moe = f", MoE {mcfg.moe.num_experts}x top-{mcfg.moe.top_k}" if mcfg.moe else ""
    console.print(f"imported [bold]{hf_dir}[/] -> run [bold]{out}[/] ({mcfg.n_layers} layers x "
                  f"d_model {mcfg.d_model}, placement {mcfg.norm_placement}, qk_norm "
                  f"{mcfg.qk_norm}{moe}); checkpoint {out / 'checkpoints' / 'step_0000000'}")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def results_table(report) -> Table:  # noqa: ANN001
    table = Table(title=f"lm-eval: {report.model} ({report.backend} backend)")
    for col in ("task", "metric", "value", "stderr", "n"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for row in report.rows:
        table.add_row(row["task"], row["metric"], _fmt(row["value"]), _fmt(row["stderr"]),
                      str(row["n"] if row["n"] is not None else "-"))
    if report.averages:
        label = f"average ({counted(len({r['task'] for r in report.rows}), 'task')})"
        table.add_section()
        table.add_row(label, "acc", _fmt(report.averages["acc"]), "", "")
        table.add_row(label, "acc_norm|acc",
                      _fmt(report.averages["acc_norm|acc"]), "", "")
    return table


def eval_cmd(
    model: Annotated[str, typer.Argument(help="A depthlab run/checkpoint dir, a Hugging Face "
                                              "model dir, a .gguf file, smollm2, or a hub id.")],
    tasks: Annotated[str | None, typer.Option(help="Comma-separated lm-eval tasks, e.g. "
                                                   "arc_easy,piqa,copa.")] = None,
    limit: Annotated[float | None, typer.Option(help="Examples per task (N), or a fraction "
                                                     "< 1; with --ppl, windows (N).")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder of datasets.save_to_disk "
                                                       "validation splits (offline).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the results JSON files "
                                                  "(default: RUN/eval for runs).")] = None,
    batch_size: Annotated[str, typer.Option(help="Batch size (or 'auto' for HF).")] = "8",
    backend: Annotated[str, typer.Option(help="auto, hf (export + lm-eval HFLM) or native "
                                              "(DepthLM adapter).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    num_fewshot: Annotated[int | None, typer.Option(help="Few-shot examples (default 0).")] = None,
    ppl: Annotated[bool, typer.Option("--ppl", help="Perplexity on held-out text.")] = False,
    data: Annotated[str | None, typer.Option(help="--ppl text: kjv or a text/JSONL file or "
                                                  "folder, not token files (default: the "
                                                  "run's validation split; kjv for HF).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="--ppl window length.")] = None,
) -> None:
    """Downstream accuracy with lm-evaluation-harness (--tasks) and/or perplexity (--ppl)."""
    if not tasks and not ppl:
        raise DepthlabError("nothing to evaluate: give --tasks (e.g. arc_easy,piqa) and/or --ppl")
    bs: int | str
    if batch_size == "auto":
        bs = "auto"
    else:
        try:
            bs = int(batch_size)
        except ValueError:
            raise DepthlabError(f"--batch-size {batch_size!r}: an integer or 'auto'") from None
        if bs < 1:
            raise DepthlabError("--batch-size must be >= 1")
    ignored = [flag for flag, given, applies in (
        ("--num-fewshot", num_fewshot is not None, tasks),
        ("--data-dir", data_dir is not None, tasks),
        ("--seq-len", seq_len is not None, ppl),
        ("--data", data is not None, ppl),
    ) if given and not applies]
    if ignored:
        raise DepthlabError(f"{', '.join(ignored)} would be ignored: --num-fewshot and --data-dir "
                            "apply to --tasks, --seq-len and --data to --ppl")
    if backend not in ("auto", "hf", "native"):
        raise DepthlabError(f"--backend {backend!r}: one of auto, hf, native")
    if limit is not None and limit <= 0:
        raise DepthlabError("--limit must be positive")
    if seq_len is not None and seq_len < 1:
        raise DepthlabError(f"--seq-len must be >= 1, got {seq_len}")
    from depthlab.outdir import check_creatable_dir
    from depthlab.paths import source_run_dir

    run = source_run_dir(Path(model).expanduser())
    target = Path(out).expanduser() if out is not None else (run / "eval" if run else None)
    if target is not None:  # refused before the model loads, not after the scoring
        check_creatable_dir(target)
    if ppl and limit is not None and not float(limit).is_integer():
        raise DepthlabError("--limit with --ppl is a number of windows (a whole number >= 1)")
    if limit is not None and limit >= 1:
        if not float(limit).is_integer():
            raise DepthlabError("--limit: a whole number of examples or a fraction < 1")
        limit = int(limit)
    _quiet_transformers()
    if tasks:
        from depthlab.interop.evaluate import run_lm_eval

        report = run_lm_eval(model, tasks, limit=limit, data_dir=data_dir, out_dir=out,
                             batch_size=bs, backend=backend, device=device,
                             num_fewshot=num_fewshot)
        console.print(results_table(report))
        for note in report.notes:
            console.print(f"note: {note}")
        console.print("averages: unweighted mean over tasks; 'acc_norm|acc' uses acc_norm where "
                      f"lm-eval reports it, else acc ({report.seconds:.1f}s)")
        for f in report.files:
            console.print(f"wrote {f}", soft_wrap=True)
    if ppl:
        from depthlab.interop.evaluate import run_perplexity, write_ppl_report

        r = run_perplexity(model, data, batch_size=bs if isinstance(bs, int) else None,
                           seq_len=seq_len, limit=int(limit) if limit else None, device=device)
        bpb = f", ~{r.bits_per_byte:.3f} bits/byte" if r.bits_per_byte is not None else ""
        ppl = f"{r.ppl:.3f}" if r.ppl is not None else "n/a"
        console.print(f"perplexity on {r.data}: loss {r.loss:.4f}, ppl {ppl}{bpb} "
                      f"({counted(r.tokens, 'token')}, {counted(r.windows, 'window')} of {r.seq_len})")
        target = out if out is not None else (r.run_dir / "eval" if r.run_dir else None)
        if target is not None:
            console.print(f"wrote {write_ppl_report(r, target.expanduser())}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add export / import-hf / eval to the depthlab CLI."""
    app.command("export")(export)
    app.command("import-hf")(import_hf_cmd)
    app.command("eval")(eval_cmd)
