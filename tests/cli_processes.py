"""Run `kapok` commands as processes of their own and collect exit status, stdout and stderr.

`run_kapok` starts the installed `kapok` script (or `python -m kapok.cli`). Commands whose failure
paths import MLflow, Feast and LightGBM (10-20 s of imports each) go through `run_forked`: one
process imports the frameworks once, then forks a child per command; each child sets its own
environment, working folder and argv, points file descriptors 1 and 2 at files, and calls the
entry point exactly as the `kapok` script does. What the child prints (warnings, logging, rich
output, a traceback) and its exit status are the command's own; an exception that escapes is
printed as the interpreter prints it and exits 1, as it would in `kapok`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Ran:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def kapok_command() -> list[str]:
    """The console script next to this interpreter, as a user runs it; else the module."""
    script = Path(sys.executable).with_name("kapok")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kapok.cli"]


def run_kapok(args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Ran:
    done = subprocess.run(
        [*kapok_command(), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )
    return Ran(args, done.returncode, done.stdout, done.stderr)


def run_forked(
    cases: list[tuple[list[str], dict[str, str]]],
    preload: list[str],
    cwd: Path,
    parallel: int = 2,
) -> tuple[list[Ran], str]:
    """Each (args, env) as a forked child of one process that imported `preload` first.
    Returns the runs and what the imports themselves printed on stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "cases.json"
        spec.write_text(
            json.dumps(
                {
                    "preload": preload,
                    "parallel": parallel,
                    "cwd": str(cwd),
                    "cases": [
                        {"args": args, "env": {**os.environ, **env}, "out": f"{tmp}/{i}"}
                        for i, (args, env) in enumerate(cases)
                    ],
                }
            )
        )
        done = subprocess.run(
            [sys.executable, str(HERE), str(spec)],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=900,
        )
        if done.returncode != 0:
            raise RuntimeError(f"fork driver failed ({done.returncode}):\n{done.stderr[-3000:]}")
        codes = json.loads(done.stdout)
        runs = [
            Ran(
                args,
                codes[i],
                Path(f"{tmp}/{i}.out").read_text(errors="replace"),
                Path(f"{tmp}/{i}.err").read_text(errors="replace"),
            )
            for i, (args, _) in enumerate(cases)
        ]
        return runs, done.stderr


def _child(case: dict, cwd: str) -> None:
    """In the forked child: become the `kapok` process of this case; never returns."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(case["env"])
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, suffix in ((1, ".out"), (2, ".err")):
            target = os.open(case["out"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["kapok", *case["args"]]
        try:
            from kapok.cli import app

            app()  # the `kapok` script: sys.exit(app())
            code = 0
        except SystemExit as e:  # what the interpreter does with sys.exit(value)
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()  # an uncaught exception: the interpreter's traceback, exit 1
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _main(spec_path: str) -> None:
    import importlib

    spec = json.loads(Path(spec_path).read_text())
    import kapok.cli  # noqa: F401

    for name in spec["preload"]:
        importlib.import_module(name)
    codes: dict[int, int] = {}
    running: dict[int, int] = {}  # pid -> case index
    for i, case in enumerate(spec["cases"]):
        while len(running) >= spec["parallel"]:
            pid, status = os.wait()
            codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
        pid = os.fork()
        if pid == 0:
            _child(case, spec["cwd"])
        running[pid] = i
    while running:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps([codes[i] for i in range(len(spec["cases"]))]))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    _main(sys.argv[1])
