"""What a new user gets wrong, answered in one line naming the field or file and the fix (issue 24,
"Trust at the edges"): config files that are not YAML, non-finite numbers, output paths that cannot
be written (checked before the work), and labels outside the model's classes.

In-process tests are in the fast tier; the two that run a job as a process are `integration`."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from advflow.platform.config import ConfigError, load_config
from advflow.platform.outputs import OutputError, check_writable

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "configs" / "digits_tiny.yaml"


def _job(name: str):
    path = REPO / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name.replace('/', '_')}_user_errors", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def _png() -> bytes:
    """A real 1x1 RGB PNG."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def _one_line(err: Exception, *needles: str) -> str:
    text = str(err)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, text
    return text


# ------------------------------------------------------------------------- 1. config files


@pytest.mark.parametrize("name,content,needles", [
    ("grid.png", _png(), ["is a PNG image, not a YAML config", "pass the run's .yaml file"]),
    ("latin1.yaml", "run: {name: café}\n".encode("latin-1"), ["is not UTF-8 text (byte 0xe9 on line 1)", "save it as UTF-8"]),
    ("utf16.yaml", "run: {name: x}\n".encode("utf-16"), ["is not UTF-8 text", "save it as UTF-8"]),
    ("weights.bin", b"\x00\x01\x02\x03" * 64, ["is a binary file, not a YAML config"]),
    ("empty.yaml", b"", ["is empty (no settings)", "jobs/configs/"]),
    ("comments.yaml", b"# TODO: fill in\n\n", ["is empty (no settings)"]),
    ("broken.yaml", b"data: {prefix: /d\noptim: [\n", ["is not valid YAML at line 2, column", "fix the syntax there"]),
    ("list.yaml", b"- data\n- optim\n", ["must hold a mapping at the top level", "got a list"]),
])
def test_a_config_file_that_is_not_a_recipe_is_one_line(tmp_path, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    _one_line(exc.value, f"config file {path}", *needles)


def test_a_folder_or_an_unreadable_file_as_config_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path)
    _one_line(exc.value, f"config file {tmp_path} is a folder", "pass a YAML file")
    path = tmp_path / "secret.yaml"
    path.write_text("data: {prefix: /d}\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root, who runs CI
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    _one_line(exc.value, f"config file {path} is not readable (permission denied)", f"chmod u+r {path}")


def test_a_bad_base_is_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "a.yaml")
    _one_line(exc.value, "base: 3 is not a file name", "base: other.yaml")
    (tmp_path / "b.yaml").write_text("base: grid.png\n")
    (tmp_path / "grid.png").write_bytes(_png())
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "b.yaml")
    _one_line(exc.value, f"config file {tmp_path / 'grid.png'} is a PNG image")


@pytest.mark.integration  # runs jobs/train.py as a process
def test_train_with_a_png_as_config_prints_one_line_and_exits_2(tmp_path):
    (tmp_path / "x.png").write_bytes(_png())
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--config", "x.png"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2, lines
    assert len(lines) == 1 and "x.png is a PNG image, not a YAML config" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no mlflow.db, no run folder


# ------------------------------------------------------------------------- 2. non-finite numbers


@pytest.mark.parametrize("override,message", [
    ("optim.lr=.nan", "optim.lr: nan is not a finite number; set a finite value (the default is 0.0001)"),
    ("optim.lr=nan", "optim.lr: nan is not a finite number; set a finite value"),
    ("optim.lr=-.inf", "optim.lr: -inf is not a finite number"),
    ("optim.lr=1e999", "optim.lr: 1e999 is not a finite number"),
    ("optim.ema_decay=.nan", "optim.ema_decay: nan is not a finite number"),
    ("optim.betas=[0.0, .nan]", "optim.betas[1]: nan is not a finite number"),
    ("adversarial.ot_scale=.inf", "adversarial.ot_scale: inf is not a finite number; set a finite value (the default is 0.2)"),
    ("adversarial.ot_scale={kind: cosine, start: 0.2, end: .nan, steps: 100}",
     "adversarial.ot_scale.end: nan is not a finite number"),
    ("adversarial.gp_fraction=.nan", "adversarial.gp_fraction: nan is not a finite number"),
    ("eval.times=[0.0, .nan, 0.5]", "eval.times[1]: nan is not a finite number"),
    ("eval.times=[0.0, inf]", "eval.times[1]: inf is not a finite number"),
    ("phases=[{name: decay, start: 0}, {name: ema, start: 500, lr: .nan}]", "phases[1].lr: nan is not a finite number"),
    ("watchdog.logit_bound=.inf", "watchdog.logit_bound: inf is not a finite number; set a finite value (the default is 10000.0)"),
    ("distributed.timeout_s=.nan", "distributed.timeout_s: nan is not a finite number"),
    ("train.steps=.inf", "train.steps: inf is not a finite number"),
])
def test_a_non_finite_number_names_its_own_field(override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(RECIPE, ["data.prefix=/d", override])
    text = _one_line(exc.value, message)
    assert "phases / adversarial.ot_scale" not in text or override.startswith(("phases", "adversarial.ot"))


def test_a_non_finite_number_in_the_yaml_file_names_its_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {RECIPE}\ndata: {{prefix: /d}}\noptim: {{lr: .NaN}}\n")
    with pytest.raises(ConfigError, match=r"^optim\.lr: nan is not a finite number"):
        load_config(path)


def test_an_unknown_key_with_a_non_finite_value_is_reported_as_unknown():
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) \['lrr'\]"):
        load_config(RECIPE, ["data.prefix=/d", "optim.lrr=.nan"])


def test_strings_that_spell_nan_stay_strings_where_the_field_is_text():
    assert load_config(RECIPE, ["data.prefix=/d", "run.name=nan"]).run.name == "nan"


# ------------------------------------------------------------------------- 3. output paths


def test_check_writable_refuses_what_cannot_be_written(tmp_path):
    cases = {
        ("/proc/x.png", False): ["--out /proc/x.png: cannot create files in /proc", "a folder you can write to"],
        (str(tmp_path), False): [f"--out {tmp_path}: is a folder; pass a file path"],
    }
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases[(str(afile / "x.png"), False)] = [f"{afile} is a file, not a folder"]
    cases[(str(afile), True)] = ["exists and is not a folder"]
    for (path, folder), needles in cases.items():
        with pytest.raises(OutputError) as exc:
            check_writable(path, "--out", folder=folder)
        _one_line(exc.value, *needles)


def test_check_writable_accepts_new_paths_and_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "a" / "b" / "grid.png", "--out")  # the job creates the folders
    check_writable(tmp_path / "run", "--out", folder=True)
    check_writable(tmp_path, "--out", folder=True)
    for skipped in (None, "", "s3://bucket/prefix/x.npz"):
        check_writable(skipped, "--out")
    assert list(tmp_path.iterdir()) == []  # no probe file, no folder made


BAD = "/proc/advflow-out"


def test_generate_checks_its_outputs_before_loading_the_model(capsys):
    gen = _job("generate")
    # --model does not exist either: the output is checked first (nothing is loaded or generated).
    assert gen.main(["--model", "/nonexistent-model", "--out", f"{BAD}.png"]) == 2
    assert f"--out {BAD}.png: cannot create files in /proc" in capsys.readouterr().err
    assert gen.main(["--model", "/nonexistent-model", "--out", "/tmp/ok.png", "--npz", f"{BAD}.npz"]) == 2
    assert f"--npz {BAD}.npz: cannot create files in /proc" in capsys.readouterr().err


@pytest.mark.parametrize("job,argv,needle", [
    ("prepare_latents", ["--source", "digits", "--out", BAD], f"--out {BAD}"),
    ("toy", ["--out", BAD, "--steps", "1"], f"--out {BAD}"),
    ("reproduce", ["--config", str(RECIPE), "--set", "data.prefix=/d", "--out", BAD],
     f"--out (with --name) {BAD}/reproduce_digits"),
    ("sweep", ["--config", str(RECIPE), "--set", "data.prefix=/d", "--space",
               str(REPO / "jobs/configs/sweeps/digits_space.yaml"), "--trials", "1", "--report", f"{BAD}.html"],
     f"--report {BAD}.html"),
    ("sweep", ["--config", str(RECIPE), "--set", "data.prefix=/d", "--space",
               str(REPO / "jobs/configs/sweeps/digits_space.yaml"), "--trials", "1", "--storage",
               f"sqlite:///{BAD}/s.db"], f"--storage {BAD}/s.db"),
])
def test_jobs_refuse_an_unwritable_output_before_the_work(capsys, job, argv, needle):
    assert _job(job).main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "cannot create files in /proc" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("job,call,needle", [
    ("fid_reference", lambda m, inc: m.parse_args(["--images", "/tmp", "--inception", inc, "--out", f"{BAD}.npz"]),
     f"--out {BAD}.npz"),
    ("fid_reference", lambda m, inc: m.parse_args(["--images", "/tmp", "--inception", inc, "--out", "/tmp/r.npz",
                                                   "--adm-batch", f"{BAD}.npz"]), f"--adm-batch {BAD}.npz"),
    ("bench/demo_rows", lambda m, inc: m.main(["--config", "c", "--data", "d", "--out", f"{BAD}.json"]),
     f"--out {BAD}.json"),
    ("bench/bench_train", lambda m, inc: m.parse(["--json", f"{BAD}.json"]), f"--json {BAD}.json"),
    ("bench/bench_train", lambda m, inc: m.parse(["--work", BAD]), f"--work {BAD}"),
    ("bench/bench_checkpoint_size", lambda m, inc: m.main(["--out", BAD]), f"--out {BAD}"),
])
def test_argparse_jobs_refuse_an_unwritable_output(tmp_path, capsys, job, call, needle):
    inception = tmp_path / "inception.pth"
    inception.write_bytes(b"weights")
    with pytest.raises(SystemExit) as exc:
        call(_job(job), str(inception))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "cannot create files in /proc" in err, err


# ------------------------------------------------------------------------- 4. labels


def test_labels_outside_the_model_are_listed_once_as_ranges():
    gen = _job("generate")
    with pytest.raises(ValueError) as exc:
        gen.check_labels(gen.parse_labels("0-12"), 10, "0-12")
    assert str(exc.value) == ("--labels 0-12: labels 10-12 are outside the model's classes 0-9; "
                              "pass labels in 0-9")
    with pytest.raises(ValueError, match=r"label -1 is outside the model's classes 0-9"):
        gen.check_labels(gen.parse_labels("-1,0-3"), 10, "-1,0-3")
    with pytest.raises(ValueError, match=r"labels 10, 12-13, 20 are outside"):
        gen.check_labels(gen.parse_labels("12,10,13,12,20,3"), 10, "...")
    gen.check_labels(gen.parse_labels("0-9,3"), 10, "0-9,3")  # a repeat is another row, not an error
    assert gen.parse_labels("1,1") == [1, 1]
    with pytest.raises(ValueError, match=r"asks for over 10000 labels"):
        gen.parse_labels("0-100000000")  # refused before a 10^8-element list is built


def test_generate_lists_each_bad_label_once_before_generating(monkeypatch, capsys):
    from advflow.platform.tracking import registry

    made = []
    fake = SimpleNamespace(source={}, spec=SimpleNamespace(num_classes=10),
                           images=lambda ys, seeds: made.append(ys))
    monkeypatch.setattr(registry, "load_generator", lambda *a, **kw: fake)
    gen = _job("generate")
    assert gen.main(["--model", "/some/model", "--labels", "0-12", "--per-label", "2", "--out", "/tmp/g.png"]) == 2
    err = capsys.readouterr().err
    assert "--labels 0-12: labels 10-12 are outside the model's classes 0-9; pass labels in 0-9" in err, err
    assert "[10, 10" not in err and made == []  # nothing generated
