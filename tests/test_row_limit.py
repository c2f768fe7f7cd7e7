"""Bounded memory on any input: a row longer than data.max_row_bytes is dropped and counted as
row_too_large, with its line, before it is parsed or tokenized; a JSON Lines file is read a
bounded piece at a time, so an over-long line is never held whole."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lora_dpo.config import DataConfig, load_config
from lora_dpo.errors import DataError
from lora_dpo.sources import ROW_TOO_LARGE, Unreadable, read_source

LIMIT = 200


def row(text: str = "x") -> dict[str, str]:
    return {"prompt": f"Describe {text}.\n", "chosen": "kind and warm.", "rejected": "cold."}


def line_of(length: int) -> bytes:
    """A JSON object line of exactly `length` bytes, without its line end."""
    base = json.dumps(row("")).encode()
    filler = length - len(base)
    assert filler >= 0
    return json.dumps(row("y" * filler)).encode()


def kinds(source) -> list[str]:
    return [r.reason if isinstance(r, Unreadable) else "row" for r in source.rows]


def test_the_limit_is_on_the_line_without_its_end(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        line_of(LIMIT)
        + b"\n"  # 1: exactly the limit: kept
        + line_of(LIMIT + 1)
        + b"\n"  # 2: one byte over
        + b"\n"  # 3: blank
        + line_of(LIMIT)
        + b"\r\n"  # 4: the limit, with a CRLF end: kept
        + line_of(LIMIT + 1)
        + b"\r\n"  # 5: over, CRLF
        + line_of(10 * LIMIT)
        + b"\n"  # 6: far over: read on in pieces
        + line_of(LIMIT + 1)  # 7: over, at the end of the file without a line end
    )
    source = read_source(str(path), max_row_bytes=LIMIT)
    assert source.lines == [1, 2, 4, 5, 6, 7]
    assert kinds(source) == ["row", ROW_TOO_LARGE, "row", ROW_TOO_LARGE, ROW_TOO_LARGE, ROW_TOO_LARGE]
    assert source.rows[1].detail == f"{LIMIT + 1} bytes, more than data.max_row_bytes={LIMIT}"
    assert source.rows[4].detail == f"{10 * LIMIT} bytes, more than data.max_row_bytes={LIMIT}"
    assert source.rows[0] == row("y" * (LIMIT - len(json.dumps(row("")))))
    last = tmp_path / "last.jsonl"
    last.write_bytes(line_of(LIMIT))  # exactly the limit, no line end: kept
    assert kinds(read_source(str(last), max_row_bytes=LIMIT)) == ["row"]


def test_lines_and_byte_offsets_after_a_skipped_line_stay_right(tmp_path):
    big = line_of(5 * LIMIT) + b"\n"
    bad = b'{"prompt": "caf\xe9"}\n'
    data = line_of(80) + b"\n" + big + bad + line_of(90) + b"\n"
    for name, write in (
        ("d.jsonl", Path.write_bytes),
        ("d.jsonl.gz", lambda p, b: p.write_bytes(gzip.compress(b))),
    ):
        path = tmp_path / name
        write(path, data)
        source = read_source(str(path), max_row_bytes=LIMIT)
        assert source.lines == [1, 2, 3, 4]
        assert kinds(source) == ["row", ROW_TOO_LARGE, "not_utf8", "row"]
        offset = 81 + len(big) + bad.index(b"\xe9")
        assert f"at byte offset {offset}" in source.rows[2].detail


def test_other_formats_measure_a_row_by_its_text(tmp_path):
    import datasets
    import pandas

    rows = [row("a"), row("b" * 2 * LIMIT), row("c"), row("d" * 300), row("\u00e9" * (LIMIT // 2))]
    # "é" is 2 bytes in UTF-8: the last row is over the limit in bytes, not in characters.
    expected = ["row", ROW_TOO_LARGE, "row", ROW_TOO_LARGE, ROW_TOO_LARGE]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    pandas.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pandas.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.json", "wrapped.json", "d.csv", "d.parquet", "saved"):
        source = read_source(str(tmp_path / name), max_row_bytes=LIMIT)
        assert kinds(source) == expected, name
        assert source.rows[0] == row("a") and source.rows[2] == row("c")
        assert (
            source.rows[1].reason == ROW_TOO_LARGE
            and "more than data.max_row_bytes=200" in source.rows[1].detail
        )
    # Each prompt ends with a newline: every CSV record spans two lines.
    assert read_source(str(tmp_path / "d.csv"), max_row_bytes=LIMIT).lines == [2, 4, 6, 8, 10]
    # Every row fits under the default limit.
    assert kinds(read_source(str(tmp_path / "d.parquet"))) == ["row"] * 5


def test_the_setting_reaches_the_data_check(demo_workdir, tmp_path, capsys):
    from lora_dpo.cli import main

    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(line_of(n) + b"\n" for n in (100, 900, 100, 120)))
    base = [f"model.name_or_path={demo_workdir / 'model'}", f"data.train_path={path}"]
    assert main(["data", "check", *base, "data.max_row_bytes=500"]) == 0
    out = capsys.readouterr().out
    assert "3 pairs kept, 1 dropped" in out
    assert "dropped 1 row_too_large (rows 1)" in out
    assert "line 2 (row 1): 900 bytes, more than data.max_row_bytes=500" in out
    assert main(["data", "check", *base]) == 0
    assert "4 pairs kept, 0 dropped" in capsys.readouterr().out
    assert main(["data", "check", *base, "data.max_row_bytes=500", "data.strict=true"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}: line 2 (row 1): 900 bytes, more than data.max_row_bytes=500 "
        "(row_too_large; data.strict=true stops at the first bad row)"
    )


def test_default_limit_is_a_few_mib():
    assert DataConfig().max_row_bytes == 8 * 2**20
    assert load_config(None, ["data.max_row_bytes=1"]).data.max_row_bytes == 1


# --------------------------------------------------------------- a 200 MB row, in a process

HUGE_MIB = 200

# Runs `lora-dpo data check` and reports the process's own peak RSS: the count is not mixed with
# that of any other child of the test process.
RUNNER = textwrap.dedent(
    """
    import resource, sys, time
    from lora_dpo.cli import main
    started = time.perf_counter()
    code = main(sys.argv[1:])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"MEASURED {peak_kib} {time.perf_counter() - started:.2f}", file=sys.stderr)
    sys.exit(code)
    """
)


def run_data_check(model: Path, path: Path) -> tuple[str, float, float]:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNNER,
            "data",
            "check",
            f"model.name_or_path={model}",
            f"data.train_path={path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    measured = [line for line in result.stderr.splitlines() if line.startswith("MEASURED ")][-1]
    peak_kib, seconds = measured.split()[1:]
    return result.stdout, int(peak_kib) / 1024, float(seconds)


def write_huge_row_file(path: Path, good: list[bytes]) -> int:
    """good[0], then a valid 200 MB row (written in chunks, never held), then the rest; returns
    the big row's length."""
    head, chunk = b'{"prompt": "Describe ', b"very " * (2**20 // 5)
    tail = b'kind people.\\n", "chosen": "kind.", "rejected": "cold."}'
    with open(path, "wb") as handle:
        handle.write(good[0] + b"\n" + head)
        for _ in range(HUGE_MIB):
            handle.write(chunk)
        handle.write(tail + b"\n")
        for line in good[1:]:
            handle.write(line + b"\n")
    return len(head) + HUGE_MIB * len(chunk) + len(tail)


def test_a_200_mb_row_costs_neither_memory_nor_time(demo_workdir, tmp_path):
    good = [json.dumps(row(name)).encode() for name in ("Ada", "Alan", "Grace")]
    small = tmp_path / "small.jsonl"
    small.write_bytes(b"".join(line + b"\n" for line in good))
    huge = tmp_path / "huge.jsonl"
    length = write_huge_row_file(huge, good)
    assert length > HUGE_MIB * 10**6
    model = demo_workdir / "model"

    _, baseline_mib, baseline_s = run_data_check(model, small)
    out, peak_mib, seconds = run_data_check(model, huge)
    assert "3 pairs kept, 1 dropped" in out
    assert "dropped 1 row_too_large (rows 1)" in out
    assert f"line 2 (row 1): {length} bytes, more than data.max_row_bytes={8 * 2**20}" in out
    # Without the bound: minutes and many GB (the row was parsed and tokenized).
    assert peak_mib - baseline_mib < 150, (peak_mib, baseline_mib)
    assert seconds < baseline_s + 20, (seconds, baseline_s)


def test_strict_mode_names_an_over_long_row_under_the_default_limit(demo_workdir, tmp_path):
    from lora_dpo.data import load_preference_data
    from lora_dpo.model import load_tokenizer

    limit = DataConfig().max_row_bytes
    big = b'{"prompt": "' + b"a" * limit + b'"}'
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(row("Ada")).encode() + b"\n" + big + b"\n")
    config = load_config(
        None, [f"model.name_or_path={demo_workdir / 'model'}", f"data.train_path={path}", "data.strict=true"]
    )
    with pytest.raises(DataError) as caught:
        load_preference_data(config.data, load_tokenizer(config.model))
    assert str(caught.value) == (
        f"{path}: line 2 (row 1): {len(big)} bytes, more than data.max_row_bytes={limit} "
        "(row_too_large; data.strict=true stops at the first bad row)"
    )
