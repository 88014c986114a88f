"""The `depthlab` command. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from depthlab.errors import DepthlabError
from depthlab.text import counted, perplexity

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Are the deep layers of a language model doing anything? Train, diagnose, report.",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Prepare token files.")
app.add_typer(data_app, name="data")
console = Console(soft_wrap=True)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: --set model.n_layers=16"),
]


def _config_from(path: Path, overrides: list[str] | None):
    from depthlab.config import load_config

    return load_config(path, overrides or [])


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config (see configs/).")],
    set_: SetOption = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train (or resume) a DepthLM run described by CONFIG."""
    from depthlab.train import train as run_training

    cfg = _config_from(config, set_)
    summary = run_training(cfg, progress=progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 alone reports
        return
    if summary.status == "already complete":
        console.print(f"[yellow]{summary.run_dir} is already complete[/] (step {summary.step}).")
    ppl = perplexity(summary.val_loss)
    val = (f"{summary.val_loss:.4f} (PPL {ppl:.2f})" if ppl is not None
           else "n/a" if summary.val_loss is None else f"{summary.val_loss}")
    tensorboard = (f"  tensorboard: {summary.run_dir / 'tensorboard'}"
                   if cfg.train.tensorboard else "")
    console.print(
        f"run: [bold]{summary.run_dir}[/]  steps {summary.step}  val loss {val}  "
        f"({summary.seconds:.0f}s)\n"
        f"  metrics: {summary.run_dir / 'metrics.jsonl'}{tensorboard}\n"
        f"  checkpoints: {summary.run_dir / 'checkpoints'}"
    )


@data_app.command("prepare")
def data_prepare(
    corpus: Annotated[str | None, typer.Option(
        help="kjv (default), a text/JSONL file or a folder.")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="byte (default), bpe, or a tokenizer.json path.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: cache).")] = None,
    bpe_vocab_size: Annotated[int | None, typer.Option(
        help="Vocabulary size for bpe (default 4096).")] = None,
    config: Annotated[Path | None, typer.Option(help="Take the data section of a run config.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a data key: --set data.seq_len=256")] = None,
) -> None:
    """Tokenize a corpus into train.bin/val.bin plus manifest.json."""
    from depthlab.config import build_config
    from depthlab.data import prepare
    from depthlab.data.corpus import is_token_dir
    from depthlab.data.prepare import tokenizer_notes

    given = {k: v for k, v in (("corpus", corpus), ("tokenizer", tokenizer),
                               ("bpe_vocab_size", bpe_vocab_size)) if v is not None}
    keys = [item.split("=", 1)[0].strip() for item in set_ or []]
    other = [k for k in keys if not k.startswith("data.")]
    if other:
        raise DepthlabError(f"--set {other[0]}: data prepare reads only the data section "
                            "(--set data.KEY=VALUE)")
    if config is not None:
        if given:
            raise DepthlabError("--config takes the data section from the config: change it "
                                "with --set data.corpus=... instead of --corpus/--tokenizer/"
                                "--bpe-vocab-size")
        data_cfg = _config_from(config, set_).data
    else:  # the options left out take the config defaults
        data_cfg = build_config({"data": given}, set_ or []).data
    if data_cfg.tokenizer != "bpe" and (bpe_vocab_size is not None
                                        or "data.bpe_vocab_size" in keys):
        raise DepthlabError(f"the BPE vocabulary size applies to --tokenizer bpe, not "
                            f"{data_cfg.tokenizer}")
    if data_cfg.corpus != "kjv" and is_token_dir(Path(data_cfg.corpus).expanduser()):
        raise DepthlabError(f"{data_cfg.corpus} already holds token files: nothing to prepare "
                            f"(train on it with --set data.corpus={data_cfg.corpus})")
    path = prepare(data_cfg, out_dir=out)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    console.print(f"tokens written to [bold]{path}[/]")
    console.print_json(json.dumps(manifest))
    err = Console(stderr=True, soft_wrap=True)
    for note in tokenizer_notes(manifest, data_cfg.tokenizer):
        err.print(f"note: {note}", highlight=False, markup=False)


def _param_table(cfg) -> Table:
    import torch

    from depthlab.data.prepare import expected_vocab
    from depthlab.model import DepthLM

    vocab, vocab_note = expected_vocab(cfg.data)
    if not cfg.model.vocab_size and vocab is None:
        table = Table(title="parameters", show_header=False)
        table.add_row("note", f"model.vocab_size unset and the vocabulary is {vocab_note}: "
                              "set model.vocab_size to count")
        return table
    mcfg = cfg.model if cfg.model.vocab_size else cfg.model.model_copy(update={"vocab_size": vocab})
    with torch.device("meta"):
        model = DepthLM(mcfg)
    table = Table(title="parameters", show_header=False)
    total, active = model.num_params(), model.num_params(active=True)
    table.add_row("total", f"{total:,} ({total / 1e6:.1f}M)")
    table.add_row("active per token", f"{active:,} ({active / 1e6:.1f}M)")
    table.add_row("non-embedding", f"{model.num_params(include_embeddings=False):,}")
    table.add_row("layers x d_model", f"{mcfg.n_layers} x {mcfg.d_model}")
    table.add_row("heads / kv heads (G)", f"{mcfg.n_heads} / {mcfg.kv_heads} (G={mcfg.group_size})")
    if mcfg.moe:
        table.add_row("experts (top-k)", f"{mcfg.moe.num_experts} (top-{mcfg.moe.top_k})")
    if not cfg.model.vocab_size:
        table.add_row("note", f"model.vocab_size unset: counted with {vocab_note}")
    return table


@app.command()
def info(
    target: Annotated[Path, typer.Argument(help="A run directory or a YAML config.")],
    set_: SetOption = None,
) -> None:
    """Config, parameter counts (total/active) and the last metrics of a run or config."""
    import yaml

    from depthlab.paths import CONFIG_FILE, METRICS_FILE, checkpoint_dirs, enclosing_run
    from depthlab.report.data import read_records
    from depthlab.train.trainer import read_run_config

    if not target.exists():
        raise DepthlabError(f"{target}: no such run directory or config file")
    # a checkpoint, its weights or the checkpoints folder: show its run (a YAML file, the
    # run's own config.yaml included, is read as a config)
    run = None if (target / CONFIG_FILE).exists() or target.suffix in (".yaml", ".yml") \
        else enclosing_run(target)
    if run is not None:
        Console(stderr=True, soft_wrap=True).print(
            f"note: {target} is inside run {run}; showing the run", markup=False, highlight=False)
        target = run
    is_run = target.is_dir()
    if is_run and set_:
        raise DepthlabError("--set applies to a config file, not to a run directory "
                            f"({target}): its config is the one it was trained with")
    cfg = read_run_config(target) if is_run else _config_from(target, set_)
    console.rule(f"[bold]{target}")
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
    console.print(_param_table(cfg))
    if not is_run:
        return
    records, bad = read_records(target / METRICS_FILE)  # for showing: bad lines skipped
    if bad:
        console.print(f"[yellow]note:[/] {counted(bad, 'unreadable line')} in "
                      f"{target / METRICS_FILE} skipped")
    last_train = next((r for r in reversed(records) if "loss" in r), None)
    last_val = next((r for r in reversed(records) if "val_loss" in r), None)
    table = Table(title="last metrics", show_header=False)
    if last_train:
        table.add_row("step", str(last_train.get("step")))
        table.add_row("train loss", _number(last_train["loss"], ".4f"))
        table.add_row("tokens/s", _number(last_train.get("tokens_per_s", 0), ",.0f"))
    if last_val:
        table.add_row("val loss / ppl", f"{_number(last_val['val_loss'], '.4f')} / "
                                        f"{_number(last_val.get('val_ppl'), '.2f')}")
    ckpts = checkpoint_dirs(target)
    table.add_row("checkpoints", ", ".join(p.name for p in ckpts) or "none")
    console.print(table)


def _number(value: object, spec: str) -> str:
    """`value` formatted with `spec`, or as found when a hand-edited record holds no number."""
    return format(value, spec) if isinstance(value, (int, float)) else repr(value)


def _register_optional_commands() -> None:
    """Subcommands that live next to their feature (diagnose, report, ...)."""
    import importlib

    for module in ("depthlab.probe.cli", "depthlab.report.cli", "depthlab.interop.cli",
                   "depthlab.experiments.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and err.name.startswith("depthlab"):
                continue
            raise
        mod.register(app)


# The file system's refusals of a path (or of space): a user's or a machine's problem, said
# in one line. Any other OSError (network, a bug in depthlab) keeps its traceback.
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                errno.EROFS, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOTEMPTY}
_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def _file_system_refusal(err: OSError) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)) or not err.strerror:
        return False
    return err.errno in _SPACE_ERRNOS or (err.errno in _PATH_ERRNOS and bool(err.filename))


def _fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}",
                                               highlight=False)
    sys.exit(code)


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) as raised by this typer: recent typers raise their own vendored
    copy of click's exceptions, which are not subclasses of the `click` package's."""
    usage = {c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"}
    aborts = {typer.Abort}
    try:
        import click

        usage.add(click.exceptions.ClickException)
        aborts.add(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(aborts)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's time limit, `docker stop`, `kill`), raised where Ctrl-C
    would be, so that the same clean-up runs (temporary checkpoints removed, a sweep's
    status written) instead of the process dying mid-write."""


_TERMINATED: list[int] = []
"""The SIGTERM received, if any (typer reports it as the Ctrl-C exit code 130)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    _TERMINATED.append(signum)
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2, never a traceback."""
    import signal

    _TERMINATED.clear()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _register_optional_commands()  # (imports: a Ctrl-C here is an interruption too)
        # Outside standalone mode typer turns Ctrl-C (and any typer.Exit) into a returned
        # exit code instead of raising it.
        code = app(args=argv, standalone_mode=False)
    except DepthlabError as err:
        _fail(str(err))
    except OSError as err:
        if not _file_system_refusal(err) or os.environ.get("DEPTHLAB_DEBUG"):
            raise
        where = f": {err.filename}" if err.filename else ""
        where += f" -> {err.filename2}" if err.filename2 else ""
        if err.errno in (errno.EEXIST, errno.ENOTDIR) and err.filename \
                and not os.path.isdir(err.filename):
            # what mkdir says when a file (or a dangling link) sits where a directory must go
            _fail(f"cannot create the directory {err.filename}: a file is in the way, there "
                  f"or on its path ({err.strerror})")
        _fail(f"{err.strerror}{where}")
    except Terminated:
        code = 143
    except KeyboardInterrupt:
        code = 130
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except Exception as err:  # click usage errors come through here in non-standalone mode
        usage_errors, aborts = _click_exception_types()
        if isinstance(err, usage_errors):
            if type(err).__name__ == "NoArgsIsHelpError":  # a bare command: its help
                err.show()
                sys.exit(err.exit_code)
            ctx = getattr(err, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail(f"{err.format_message()}{hint}", err.exit_code)
        if isinstance(err, aborts):
            sys.exit(1)
        raise
    if code == 130 and _TERMINATED:
        code = 143  # 128 + SIGTERM, what a scheduler expects of a terminated process
    if code in (130, 143):
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        # commands that keep finished work (checkpoints, finished runs) and resume from it;
        # the others (diagnose, eval, report ...) write their outputs only at the end
        resumes = words[:1] in (["train"], ["sweep"], ["reproduce"], ["ablate"])
        how = "interrupted" if code == 130 else "terminated (SIGTERM)"
        tail = ("; finished work is kept; run the same command again to go on from it"
                if resumes else "")
        Console(stderr=True, soft_wrap=True).print(how + tail)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
