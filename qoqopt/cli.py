"""The `qoqopt` command: one subcommand per stage of the pipeline.

Each subcommand lives in its own module and registers itself through `register(subparsers)`;
this file only wires them up and turns QoqoptError into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys

from .errors import QoqoptError, printable

# Modules providing `register(subparsers)`, in the order `--help` lists them.
COMMAND_MODULES = [
    "qoqopt.commands.mini",
    "qoqopt.commands.info",
    "qoqopt.commands.data",
    "qoqopt.commands.export",
    "qoqopt.commands.bench",
    "qoqopt.commands.ask",
    "qoqopt.commands.report",
    "qoqopt.commands.publish",
]

EPILOG = """\
examples:
  qoqopt mini --out out/mini --preset tiny --train    # build + train the mini QoQ-Med (cached)
  qoqopt info out/mini                                 # architecture summary of a checkpoint
  qoqopt info ddvd233/QoQ-Med-VL-7B                    # the same for a Hub id (metadata only)
  qoqopt data list --split eval                        # the built-in clinical evaluation set
  qoqopt export out/mini --format gguf --quant Q4_K_M,Q8_0 --out out/gguf   # GGUF + mmproj + imatrix
  qoqopt export out/mini --format gptq --bits 4 --out out/gptq             # GPTQ for vLLM / transformers
  qoqopt info out/gguf                                                      # its files: params, BPW per quant
  qoqopt ask out/gguf --item ct-abd-pancreas.region_ct.eval-0               # answer in llama.cpp
  qoqopt ask out/gptq --item ct-abd-pancreas.region_ct.eval-0               # ... in transformers
  qoqopt bench out/mini --variants bf16,gguf:Q4_K_M,gptq:4 --from out/gguf --from out/gptq --out results/
  qoqopt report results/*.json --out report/                                # Markdown + plots, merged
  qoqopt publish out/gguf --repo me/QoQ-Med-mini-GGUF --dry-run          # what would be uploaded, and the card

Each subcommand has its own --help with examples. Errors print one line and exit with status 2.
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors in the house style: one `error:` line that names the command's --help,
    exit status 2 (argparse prints the whole usage block first). Subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse refuses leftover arguments from the top parser, so its error named `qoqopt --help`,
        which does not list a subcommand's options; the subcommand the arguments chose names its own."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def _chosen(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The deepest subcommand parser that ``parsed`` went through (`qoqopt data show`)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None):
                return action.choices[getattr(parsed, action.dest)]._chosen(parsed)
        return self


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="qoqopt",
        description="Compressed, verified builds of the QoQ-Med clinical vision-language models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qoqopt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


# OSErrors a user fixes (permissions, a read-only or full disk): one line, as for QoqoptError. The
# write paths turn these into messages of their own; this catches any that a new path lets through.
USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Terminated(BaseException):
    """SIGTERM (timeout, a scheduler, `kill`) or SIGHUP (the terminal or ssh session closed) as an
    exception, so temporary outputs are removed on the way out as they are for Ctrl-C; Python's
    default is to die where it stands, which left an export's hidden build (with its BF16
    intermediate, gigabytes at 7B). SIGKILL cannot be caught: it leaves only `.*.tmp` debris, never
    a final name, and the next run into the same folder removes it (leftovers.py)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


WHY = {signal.SIGTERM: "terminated"}
if hasattr(signal, "SIGHUP"):  # not on Windows
    WHY[signal.SIGHUP] = "hangup (the terminal closed)"


def _on_signal(signum, frame):
    """The first stop signal ends the command. The second is let go: a second Ctrl-C, or the SIGTERM
    a job stop (systemd, Slurm, Kubernetes) sends every process after its own, landed in the removal
    of the temporary build and left gigabytes of it behind. A third ends the process at once (a
    cleanup that hangs, a download's threads being waited for), leaving what the next run removes."""
    _handle_next_with(_let_go)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _let_go(signum, frame):
    """The second stop signal: the command is already ending (and cleaning up)."""
    _handle_next_with(signal.SIG_DFL)


def _handle_next_with(handler) -> None:
    for s in (signal.SIGINT, *WHY):
        with contextlib.suppress(ValueError, OSError):  # not this process's handler to change
            if signal.getsignal(s) in (_on_signal, _let_go, signal.default_int_handler):
                signal.signal(s, handler)  # a Python handler: not inherited by a child exec'd now


def _catch_stop_signals() -> dict:
    """Handlers for Ctrl-C and WHY's signals; one that came in ignored (`nohup`) stays ignored, and a
    Ctrl-C handler of the caller's own (a notebook's) stays its own."""
    caught = {s: _on_signal for s in WHY if signal.getsignal(s) is not signal.SIG_IGN}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        caught[signal.SIGINT] = _on_signal
    return {s: signal.signal(s, handler) for s, handler in caught.items()}


def main(argv: list[str] | None = None) -> int:
    if os.name == "nt":  # os.pread, POSIX signals, prctl, directory renames over a folder: Linux and macOS only
        print("error: qoqopt runs on Linux and macOS; on Windows, run it under WSL2", file=sys.stderr)
        return 2
    if not sys.stderr.isatty():  # transformers' and the Hub's bars draw to any stream: a log gets \r-joined lines
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    previous = _catch_stop_signals()
    try:
        return _run(argv)
    except QoqoptError as exc:  # a message may quote a file's own text: one line, whatever it holds
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `qoqopt data list | head`: the reader has gone, so has anything left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error as Python flushes
        return 128 + signal.SIGPIPE
    except OSError as exc:
        if exc.errno not in USER_FIXABLE:  # anything else is a bug to see in full
            raise
        print(f"error: {f'{exc.filename}: ' if exc.filename else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        with contextlib.suppress(OSError):  # after a hangup the terminal may be gone
            print(f"error: {WHY[exc.signum]}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


TEXT_OPTIONS = ("--question", "--label")  # free text, whose own check names an empty one


def _refuse_empty_values(argv: list) -> None:
    """An empty value is an unset shell variable (`--image "$SCAN"`), never a choice: as a path it
    read as the current folder ("--image '': . is a directory"), as an id it was no id at all."""
    for i, arg in enumerate(argv):
        if arg == "":
            option, where = (argv[i - 1], f" after {argv[i - 1]}") if i else (None, "")
        elif isinstance(arg, str) and arg.startswith("--") and arg.endswith("="):
            option, where = arg[:-1], f" in {arg}"
        else:
            continue
        if option not in TEXT_OPTIONS:
            raise QoqoptError(f"an empty value{where} (an unset shell variable?)")


def _run(argv: list[str] | None) -> int:
    _refuse_empty_values(sys.argv[1:] if argv is None else argv)
    parser = build_parser()  # imports every command module: a Ctrl-C here is caught in main too
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = int(args.func(args) or 0)
    sys.stdout.flush()  # here, where a closed pipe is caught, not at exit (stdout to a pipe is buffered)
    return rc


if __name__ == "__main__":
    sys.exit(main())
