"""The docs are runnable and name only what exists: README.md and docs/*.md, read as a user would.

Every ``python ...`` / ``python -m ...`` command (``torchrun -m`` too), in code blocks and in inline code, runs the
quick way, in this process:

  ``python -m mtssl.run ...``       composed, resolved and validated as ``run_job`` does before training (data
                                   folder, batch per rank, out_dir); Hydra flags such as ``--cfg job`` are dropped;
  ``python -m mtssl.eval DIR ...``  a finished stand-in job's config with the overrides, as ``load_job`` builds it,
                                   validated (the overrides must leave the training config alone); with
                                   ``--weights FILE``, as ``python -m mtssl.run`` with a stand-in file;
  ``python sweeps/launch.py ...``   the launcher itself with ``--dry-run`` added: every job composed and validated;
  any other script                 run until its arguments are parsed (what ``--help`` checks, plus the options).

A command that cannot be made quick is listed in ``NOT_RUN`` with the reason; the reader's paths
(``/path/to/imagenet``) are replaced by the ``placeholders`` fixture's stand-ins. Then every name in inline code is
checked: config fields (``train.batch_size``) against the job config (its default composition plus every key any
preset of any of its groups sets) or the sweep launcher's (the same over its groups); ``group=option`` against
the group's presets; repository paths; ``mtssl.`` Python names; and relative links with their anchors. Failures
name the doc, the line and the name or command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mtssl.config.renames import RENAMED, RENAMED_SWEEP
from omegaconf import OmegaConf

from tests.support.data import make_image_folder

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LAUNCH = REPO / "sweeps" / "launch.py"

# Commands that cannot run in seconds, with the reason.
NOT_RUN = {
    'python -m pytest -q -n 2 -m "not slow and not slurm"': "the inner test loop itself (minutes)",
    "python -m pytest -q -rs -n 3 --dist loadgroup --durations=25": "the full suite itself, which .ci/run calls",
    "python -m pytest -q -x tests/test_views.py": "a test module, which the suite runs anyway",
    "python sweeps/launch.py ablation=local_crops --dry-run": "the example ablation of docs/extending.md, whose YAML "
                                                              "file the reader writes first",
}
NOT_RUN = {shlex.join(shlex.split(command)): reason for command, reason in NOT_RUN.items()}  # as parsed below
# Names the docs show on purpose as wrong input, or as a file the reader adds.
WRONG_ON_PURPOSE = {"train.epoch", "ablation=local_crops"}
# Paths in commands that stand for the reader's own data.
DATA_PLACEHOLDERS = ("/path/to/imagenet", "/path/to/cifar10")
PROGRAMS = ("python", "python3", "torchrun")
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--info", "-i"}
HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--resolve", "--show-recipe"}
FILE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".md", ".pt", ".pth", ".png", ".log", ".sh", ".csv", ".tex",
                 ".txt", ".toml", ".cnf", ".conf")
PLACEHOLDER = re.compile(r"<[^<>`]*>")


# ---------------------------------------------------------------------------------------------------------------
# Reading the docs

@dataclass(frozen=True)
class Snippet:
    """Code from a doc: one line of a code block (continuations joined) or one inline code span."""

    doc: str
    line: int
    text: str
    inline: bool

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def read_snippets(path: Path) -> tuple[list[Snippet], list[tuple[int, str]]]:
    """(code snippets, prose lines) of a Markdown file. Code blocks are fenced or indented by 4 spaces after a
    blank line; inline code spans may cross line breaks within a paragraph."""
    doc = str(path.relative_to(REPO))
    lines = path.read_text().splitlines()
    snippets, prose = [], []
    fenced, in_block, previous_blank = False, False, True
    pending: tuple[int, str] | None = None
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            previous_blank = False
            continue
        indented = line.startswith("    ") and line.strip() and (previous_blank or in_block)
        if fenced or indented:
            in_block = not fenced
            text = line.strip()
            if pending is not None:  # a continuation line of the command above
                number, text = pending[0], pending[1] + " " + text
            if text.endswith("\\"):
                pending = (number, text[:-1].rstrip())
            else:
                pending = None
                snippets.append(Snippet(doc, number, text, inline=False))
        else:
            in_block = in_block and not line.strip()
            prose.append((number, line))
        previous_blank = not line.strip()
    snippets += inline_spans(doc, prose)
    return snippets, prose


def inline_spans(doc: str, prose: list[tuple[int, str]]) -> list[Snippet]:
    """Inline code spans of the prose, per paragraph (a span may continue on the next line)."""
    spans, paragraph = [], []
    for number, line in prose + [(0, "")]:
        if line.strip():
            paragraph.append((number, line))
            continue
        if paragraph:
            text = "\n".join(line for _, line in paragraph)
            starts = [0]
            for _, line in paragraph:
                starts.append(starts[-1] + len(line) + 1)
            for match in re.finditer(r"`([^`]+)`", text):
                index = max(i for i, start in enumerate(starts[:-1]) if start <= match.start())
                spans.append(Snippet(doc, paragraph[index][0], " ".join(match.group(1).split()), inline=True))
        paragraph = []
    return spans


def all_snippets() -> list[Snippet]:
    return [s for path in DOCS for s in read_snippets(path)[0]]


# ---------------------------------------------------------------------------------------------------------------
# Commands

@dataclass
class Command:
    """One documented command: the program's arguments, where it was found, how it is launched."""

    text: str  # the program and its arguments, shell-quoted as parsed: for NOT_RUN and messages
    module: str | None
    script: Path | None
    args: list[str]
    world_size: int = 1
    env: dict[str, str] = field(default_factory=dict)
    where: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple:
        """What it runs: a sweep launch with and without ``--dry-run`` is one command here."""
        args = [a for a in self.args if a != "--dry-run"] if self.script == LAUNCH else self.args
        return self.module, self.script, tuple(args), self.world_size, tuple(sorted(self.env.items()))


def launcher_world_size(tokens: list[str]) -> int:
    """Ranks started by the launcher tokens before the program (torchrun's and srun's per-node counts)."""
    text = " ".join(tokens)
    found = re.search(r"--(?:nproc[-_]per[-_]node|ntasks-per-node)[= ](\d+)", text)
    return int(found.group(1)) if found else 1


def parse_commands(snippet: Snippet) -> list[Command]:
    """The python/torchrun commands of a snippet (``&&``/``;`` chains, ``cd``, ``VAR=value`` prefixes)."""
    if not re.search(r"\b(python3?|torchrun)\b", snippet.text):
        return []
    text = re.sub(r"\s\[(?:--|<)[^\]]*\](?=\s|$)", "", snippet.text)  # optional parts of a usage line
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#" if not snippet.inline else ""
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    segments, current = [], []
    for token in tokens:
        if token and set(token) <= set(";&|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    commands, cwd = [], REPO
    for segment in segments:
        redirects = [i for i, t in enumerate(segment) if re.fullmatch(r"\d*[<>].*", t)]
        segment = segment[:redirects[0]] if redirects else segment  # `2>&1 | tee log`: the shell's part
        if segment[:1] == ["cd"] and len(segment) == 2:
            cwd = (cwd / segment[1]).resolve()
            continue
        starts = [i for i, t in enumerate(segment) if Path(t).name in PROGRAMS]
        if not starts:
            continue
        start = starts[0]
        env = dict(t.split("=", 1) for t in segment[:start] if re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", t))
        program, rest = Path(segment[start]).name, segment[start + 1:]
        world = launcher_world_size(segment[:start])
        module = script = None
        if program == "torchrun":
            world = launcher_world_size(rest)
            if "-m" in rest[:-1]:
                module, rest = rest[rest.index("-m") + 1], rest[rest.index("-m") + 2:]
            else:
                scripts = [i for i, t in enumerate(rest) if t.endswith(".py")]
                if not scripts:
                    continue
                script, rest = cwd / rest[scripts[0]], rest[scripts[0] + 1:]
        elif rest[:1] == ["-m"] and len(rest) > 1:
            module, rest = rest[1], rest[2:]
        elif rest and rest[0].endswith(".py"):
            script, rest = cwd / rest[0], rest[1:]
        else:
            continue  # `python` alone, `python -c ...`
        if module == "...":
            continue  # `python -m ...`: prose about commands
        commands.append(Command(shlex.join(segment[start:]), module, script, [a for a in rest if a != "..."], world,
                                env, [snippet.where]))
    return commands


def documented_commands() -> list[Command]:
    """Every command of the docs, once (the same command in several places lists them all)."""
    unique: dict[tuple, Command] = {}
    for snippet in all_snippets():
        for command in parse_commands(snippet):
            if command.key in unique:
                unique[command.key].where += command.where
            else:
                unique[command.key] = command
    return list(unique.values())


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """Stand-ins for the reader's paths: a data folder big enough for every documented batch and subset (2 classes,
    4,000 training images of 8 px: data=cifar10's data.subset, which a larger one would refuse), a finished job, a
    sweep directory; MTSSL_DATA_ROOT points at the data."""
    root = tmp_path_factory.mktemp("docs")
    data = make_image_folder(root / "data", classes=2, per_class=2000, size=8, splits=("train",))
    make_image_folder(data, classes=2, per_class=2, size=8, splits=("val",))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTSSL_DATA_ROOT", str(data))
        from mtssl.config import compose_config, resolve_config
        from mtssl.job_folder import JobStatus, write_results

        job = root / "job"
        job.mkdir()
        (job / "config.yaml").write_text(OmegaConf.to_yaml(resolve_config(compose_config([f"out_dir={job}"]))))
        write_results(job, {"status": JobStatus.COMPLETED.value, "knn_top1": 50.0, "linear_top1": 50.0})
        (job / "backbone.pth").write_bytes(b"")
        (root / "weights.pth").write_bytes(b"")  # eval.weights: validation checks that the file is there
        yield {"data": data, "job": job, "sweep": root / "sweep", "cwd": root, "weights": root / "weights.pth"}


def substitute(args: list[str], places: dict) -> list[str]:
    out = []
    for arg in args:
        for placeholder in DATA_PLACEHOLDERS:
            arg = arg.replace(placeholder, str(places["data"]))
        out.append(arg.replace("<sweep_dir>", str(places["sweep"])))
    return out


def overrides_of(args: list[str]) -> list[str]:
    """A Hydra app's overrides, its flags dropped; ValueError on a flag this test cannot judge."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = True
        elif arg.split("=", 1)[0] in HYDRA_FLAGS:
            continue
        elif arg.startswith("-"):
            raise ValueError(f"flag {arg!r} is not one this test knows; add it to HYDRA_FLAGS or NOT_RUN")
        else:
            overrides.append(arg)
    return overrides


def run_job_command(command: Command, args: list[str]) -> None:
    from mtssl.config import compose_config, resolve_config
    from mtssl.config.validate import validate_config

    cfg = resolve_config(compose_config(overrides_of(args)))
    validate_config(cfg, check_data=True, world_size=command.world_size)


def run_eval_command(command: Command, args: list[str], places: dict) -> None:
    from mtssl.config.validate import validate_config
    from mtssl.eval.__main__ import load_job

    if args in (["--help"], ["-h"]):
        from mtssl.eval.__main__ import main

        with contextlib.redirect_stdout(io.StringIO()):
            assert main(args) == 0
        return
    if args and args[0] == "--weights":  # evaluate a weights file: a stand-in file, then as python -m mtssl.run
        from mtssl.config import compose_config, resolve_config

        if len(args) < 2:  # the option named as such
            return
        cfg = resolve_config(compose_config(overrides_of(args[2:])))
        cfg.eval.weights = str(places["weights"])
        validate_config(cfg, check_data=True, world_size=command.world_size)
        return
    if not args or args[0].startswith("-") or "=" in args[0]:
        raise AssertionError("python -m mtssl.eval needs a job folder first")
    cfg, _ = load_job(places["job"], args[1:])
    validate_config(cfg, check_data=True, world_size=command.world_size)


class ArgumentsParsed(Exception):
    """A script got as far as parsing its arguments: the quick run stops there."""


@contextlib.contextmanager
def as_script(script: Path, args: list[str]):
    """sys.argv and sys.path as for ``python script args``, restored afterwards, output captured."""
    argv, path = sys.argv[:], sys.path[:]
    out = io.StringIO()
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.parent))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        sys.argv, sys.path[:] = argv, path


def exit_code(error: SystemExit) -> int:
    return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)


# Job configs composed by the sweep launches, by their overrides but out_dir (see compose_once).
COMPOSED: dict[tuple[str, ...], object] = {}


def compose_once(real_compose):
    """``mtssl.config.compose_config``, memoised on the overrides other than ``out_dir``: the launches of one sweep
    on two launchers compose the same jobs into other folders, and Hydra takes a good part of a second for each.
    Every call gets its own copy, with its own out_dir."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    def compose(overrides=()):
        overrides = list(overrides)
        key = tuple(o for o in overrides if not o.startswith("out_dir="))
        if key not in COMPOSED:
            COMPOSED[key] = real_compose(list(key))
        cfg = copy.deepcopy(COMPOSED[key])
        for override in overrides:
            if override.startswith("out_dir="):
                cfg.out_dir = OverridesParser.create().parse_override(override).value()
        return cfg

    return compose


def run_launch_command(command: Command, args: list[str], monkeypatch) -> None:
    import mtssl.config
    from hydra.core.global_hydra import GlobalHydra

    if "--dry-run" not in args and "dry_run=true" not in args:
        args = [*args, "--dry-run"]
    monkeypatch.setattr(mtssl.config, "compose_config", compose_once(mtssl.config.compose_config))
    code = 0
    with as_script(command.script, args) as out:
        try:
            runpy.run_path(str(command.script), run_name="__main__")
        except SystemExit as error:
            code = exit_code(error)
        finally:
            GlobalHydra.instance().clear()
    if code != 0 or "Dry run: nothing submitted." not in out.getvalue():
        raise AssertionError(f"exit {code}:\n{out.getvalue()[-3000:]}")


def run_argparse_script(command: Command, args: list[str], monkeypatch) -> None:
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **k):
        raise ArgumentsParsed(parse_args(self, *a, **k))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with as_script(command.script, args) as out:
        try:
            runpy.run_path(str(command.script), run_name="__main__")
        except ArgumentsParsed:
            return
        except SystemExit as error:
            raise AssertionError(f"exit {exit_code(error)} while parsing its arguments:\n{out.getvalue()[-2000:]}")
    raise AssertionError("the script ran without parsing arguments with argparse: it cannot be stopped early; "
                         "add it to NOT_RUN with the reason")


# A sweep launch composes and validates every job of its grid (Hydra takes a good part of a second per job).
PARAMS = [pytest.param(c, id=c.where[0], marks=[pytest.mark.slow] if c.script == LAUNCH else []) for c in COMMANDS]


@pytest.mark.parametrize("command", PARAMS)
def test_documented_command_runs(command, placeholders, monkeypatch):
    """The command, the quick way (see the module docstring)."""
    if command.text in NOT_RUN:
        pytest.skip(f"not run: {NOT_RUN[command.text]}")
    from mtssl.config import ConfigError

    monkeypatch.chdir(placeholders["cwd"])  # relative out_dirs and sweep dirs land in a temporary folder
    for key, value in command.env.items():
        for placeholder in DATA_PLACEHOLDERS:
            value = value.replace(placeholder, str(placeholders["data"]))
        monkeypatch.setenv(key, value)
    args = substitute(command.args, placeholders)
    where = f"{', '.join(command.where)}: `{command.text}`"
    left = [a for a in args if PLACEHOLDER.search(a)]
    if left:
        raise AssertionError(f"{where}: placeholder {left} has no stand-in in this test (add one to substitute)")
    if not args:  # the program named as such (`python -m mtssl.eval`): it must exist
        exists = importlib.util.find_spec(command.module) if command.module else command.script.is_file()
        if not exists:
            raise AssertionError(f"{where}: no such module or script")
        return
    try:
        if command.module == "mtssl.run":
            run_job_command(command, args)
        elif command.module == "mtssl.eval":
            run_eval_command(command, args, placeholders)
        elif command.script == LAUNCH:
            run_launch_command(command, args, monkeypatch)
        elif command.script is not None:
            if not command.script.is_file():
                raise AssertionError(f"no such script {command.script.relative_to(REPO)}")
            run_argparse_script(command, args, monkeypatch)
        else:
            raise AssertionError(f"no quick way to run module {command.module}; add one here or list the command "
                                 f"in NOT_RUN with the reason")
    except (ConfigError, ValueError) as error:
        raise AssertionError(f"{where}: {error}") from None
    except AssertionError as error:
        raise AssertionError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Names in inline code

def dotted_keys(node, prefix: str = ""):
    """Every key of a config, dotted (sections too; lists are leaves)."""
    from omegaconf import DictConfig

    if isinstance(node, DictConfig):
        for key in node.keys():
            yield f"{prefix}{key}"
            yield from dotted_keys(node._get_node(key), f"{prefix}{key}.")


def preset_keys(path: Path, group: str) -> set[str]:
    """The dotted keys a preset file sets, under its package (``# @package _global_``: the root; else its group)."""
    header = re.search(r"^# @package (\S+)", path.read_text(), re.MULTILINE)
    package = header.group(1) if header else group
    prefix = "" if package == "_global_" else package.replace("_group_", group).replace("/", ".") + "."
    return {prefix + key for key in dotted_keys(OmegaConf.load(path)) if key.split(".")[0] not in ("defaults", "hydra")}


@dataclass(frozen=True)
class KnownConfig:
    """What a primary config can hold: every dotted key any composition of it has, and its groups' options."""

    name: str
    keys: frozenset[str]
    groups: dict[str, list[str]]

    @property
    def roots(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.keys} | set(self.groups)


def known_config(name: str, conf_dir: Path, initialize) -> KnownConfig:
    """The default composition plus what each option of each of the primary config's groups sets (read from the
    option's file; composed where the option is not a file)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    with initialize():
        primary = compose("config", return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        groups = {g: loader.get_group_options(g) for g in primary.hydra.runtime.choices if "/" not in g and "@" not in g}
        keys = {k for k in dotted_keys(primary) if not k.startswith("hydra")}
        for group, options in groups.items():
            for option in options:
                file = conf_dir / group / f"{option}.yaml"
                if file.is_file():
                    keys |= preset_keys(file, group)
                else:  # e.g. a cluster profile, registered in Hydra's ConfigStore
                    keys |= set(dotted_keys(compose("config", overrides=[f"{group}={option}"])))
    return KnownConfig(name, frozenset(keys), groups)


@pytest.fixture(scope="module")
def config_names() -> tuple[KnownConfig, KnownConfig]:
    """The job config and the sweep launcher's config."""
    from hydra import initialize_config_dir, initialize_config_module

    from mtssl.config import CONFIG_MODULE
    from sweeps.launchers import register_configs

    register_configs(REPO / "slurm" / "profiles")
    job_dir = Path(importlib.util.find_spec(CONFIG_MODULE).origin).parent
    job = known_config("job", job_dir,
                       lambda: initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"))
    sweep_dir = REPO / "sweeps" / "conf"
    sweep = known_config("sweep launcher", sweep_dir,
                         lambda: initialize_config_dir(config_dir=str(sweep_dir), version_base="1.3"))
    return job, sweep


def key_pattern(key: str) -> re.Pattern:
    """A documented key as a regex over dotted keys: ``<type>`` and ``*`` stand for one key, ``augmented_*`` for
    any key with that prefix."""
    parts = [re.escape(PLACEHOLDER.sub("*", part)).replace(r"\*", "[^.]*") for part in key.split(".")]
    return re.compile(r"\.".join(parts) + r"\Z")


def expand_braces(token: str) -> list[str]:
    """``a.{b,c}`` -> ``a.b``, ``a.c``."""
    match = re.search(r"\{([^{}]*)\}", token)
    if not match:
        return [token]
    return [t for alternative in match.group(1).split(",")
            for t in expand_braces(token[:match.start()] + alternative + token[match.end():])]


def config_problems(snippet: Snippet, configs: tuple[KnownConfig, ...], roots: list[set[str]]) -> list[str]:
    """Config fields and group options named in an inline span that do not exist (``roots``: each config's)."""
    problems = []
    for raw in PLACEHOLDER.sub("<x>", snippet.text).split():
        raw = raw.strip("'\"`,;:()")
        token = raw.lstrip("+~")
        key, _, value = token.partition("=")
        if not key or "/" in key or key.lower().endswith(FILE_SUFFIXES) or key.startswith("-"):
            continue
        root = key.split(".", 1)[0]
        for config, its_roots in zip(configs, roots):
            if root not in its_roots or root == "hydra" or key in WRONG_ON_PURPOSE or token in WRONG_ON_PURPOSE:
                continue
            if key in RENAMED or key in RENAMED_SWEEP or any(key.startswith(f"{old}.") for old in RENAMED):
                continue  # an old name, documented beside its replacement (mtssl/config/renames.py refuses it)
            if "." not in key:  # group=option; a|b|c: each option
                options = value.split("|") if value and not set(value) & set("<=,") else []
                for option in options:
                    if root in config.groups and option not in config.groups[root]:
                        problems.append(f"{snippet.where}: {key}={option}: no such preset (valid: {config.groups[root]})")
                continue
            wanted = key.rsplit(".", 1)[0] if raw.startswith("+") else key  # +key=...: adds a key; its parent exists
            for candidate in expand_braces(wanted):
                pattern = key_pattern(candidate)
                if not any(pattern.match(k) for k in config.keys):
                    problems.append(f"{snippet.where}: {candidate}: not a field of the {config.name} config")
    return problems


def ignored_by_git(relative: str) -> bool:
    """Whether a path falls under a pattern of .gitignore (generated outputs: runs/, sweeps/outputs/, ...)."""
    parts = relative.split("/")
    for pattern in (REPO / ".gitignore").read_text().splitlines():
        name = pattern.strip().strip("/")
        if not name or name.startswith("#"):
            continue
        if "/" in name:  # anchored at the repository root
            if relative == name or relative.startswith(name + "/"):
                return True
        elif any(fnmatch.fnmatch(part, name) for part in parts):
            return True
    return False


def path_problems(snippet: Snippet) -> list[str]:
    """Repository paths (``mtssl/eval/job.py``, ``sweeps/conf/profile/*.yaml``) that match no file."""
    problems = []
    tops = {p.name for p in REPO.iterdir() if not p.name.startswith(".git")}
    for raw in PLACEHOLDER.sub("<x>", snippet.text).split():
        token = raw.strip("'\"`,;:()")
        if "/" not in token and token not in tops:
            continue
        if token.split("/", 1)[0] not in tops or "=" in token or ignored_by_git(token.rstrip("/")):
            continue
        for candidate in expand_braces(PLACEHOLDER.sub("*", token).rstrip("/")):
            if not list(REPO.glob(candidate)) and not (REPO / candidate).exists():
                problems.append(f"{snippet.where}: {token}: no such file or folder in the repository")
    return problems


def python_name_problems(snippet: Snippet) -> list[str]:
    """``mtssl.`` module and attribute names that do not resolve."""
    match = re.fullmatch(r"(mtssl(?:\.\w+)+)(\(.*\))?", snippet.text)
    if not match:
        return []
    parts = match.group(1).split(".")
    for split in range(len(parts), 0, -1):
        module = ".".join(parts[:split])
        try:
            target = importlib.import_module(module)
        except ImportError:
            continue
        for attribute in parts[split:]:
            if not hasattr(target, attribute):
                return [f"{snippet.where}: {match.group(1)}: {module} has no {'.'.join(parts[split:])}"]
            target = getattr(target, attribute)
        return []
    return [f"{snippet.where}: {match.group(1)}: no such module"]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces as '-')."""
    anchors, seen = set(), {}
    fenced = False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problems(path: Path, prose: list[tuple[int, str]]) -> list[str]:
    problems = []
    doc = path.relative_to(REPO)
    for number, line in prose:
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{doc}:{number}: link {target}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                problems.append(f"{doc}:{number}: link {target}: no heading with anchor #{anchor} in "
                                f"{linked.relative_to(REPO)}")
    return problems


def test_named_fields_presets_paths_names_and_links_exist(config_names):
    roots = [config.roots for config in config_names]
    problems = []
    for path in DOCS:
        snippets, prose = read_snippets(path)
        for snippet in snippets:
            if snippet.inline:
                problems += config_problems(snippet, config_names, roots)
                problems += python_name_problems(snippet)
            problems += path_problems(snippet)
        problems += link_problems(path, prose)
    assert not problems, "the docs name what does not exist:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The checker itself

def test_the_checks_see_what_is_wrong(config_names, tmp_path):
    """A wrong field, preset, path, name and command are each reported (so passing means something)."""
    roots = [config.roots for config in config_names]
    wrong = Snippet("x.md", 3, "train.batch_sise=8 regime=gpu cluster.partitoin=x +train.a.b=1", inline=True)
    assert [p.split(": ", 2)[1] for p in config_problems(wrong, config_names, roots)] == [
        "train.batch_sise", "regime=gpu", "cluster.partitoin", "train.a"]
    fine = "views.types.<type>.{count,size} eval.augmented_* +train.new=1 profile.data_root method=<name> train/loss"
    assert config_problems(Snippet("x.md", 1, fine, True), config_names, roots) == []
    assert path_problems(Snippet("x.md", 1, "mtssl/eval/nothing.py mtssl/conf/regime_method/<x>.yaml", True)) == [
        "x.md:1: mtssl/eval/nothing.py: no such file or folder in the repository"]
    assert python_name_problems(Snippet("x.md", 1, "mtssl.config.NO_SUCH_NAME", True))
    assert not python_name_problems(Snippet("x.md", 1, "mtssl.eval.__main__.reevaluate(out_dir, overrides)", True))
    (tmp_path / "doc.md").write_text("## The CPU scale (`scale=cpu`)\n\nSee [a](#the-cpu-scale-scalecpu), [b](#nope).\n")
    assert heading_anchors(tmp_path / "doc.md") == {"the-cpu-scale-scalecpu"}
    snippet = Snippet("x.md", 2, "cd benchmarks && MTSSL_DATA_ROOT=/d python train_step.py --quick", False)
    (command,) = parse_commands(snippet)
    assert (command.script, command.args, command.env) == (REPO / "benchmarks" / "train_step.py", ["--quick"],
                                                           {"MTSSL_DATA_ROOT": "/d"})
    (command,) = parse_commands(Snippet("x.md", 1, "torchrun --nproc-per-node 8 -m mtssl.eval runs/x eval.a=1", True))
    assert (command.module, command.args, command.world_size) == ("mtssl.eval", ["runs/x", "eval.a=1"], 8)
