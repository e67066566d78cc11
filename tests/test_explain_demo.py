"""``attrefine-fast explain-demo``: its rows, the batched call on the same superpixels, the overlays."""
import io
import re

import pytest

from attrefine_fast.cli import main
from attrefine_fast.demo_explain import PHOTOS


@pytest.mark.parametrize("with_lime", [True, False], ids=["lime", "no-lime"])
def test_explain_demo_rows_and_the_batched_call_agree(tmp_path, capsys, with_lime):
    if with_lime:
        pytest.importorskip("lime")
    main(["explain-demo", "--size", "48", "--num-samples", "60", "--out", str(tmp_path)] + ([] if with_lime else ["--no-lime"]))
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split()[:1] and line.split()[0] in PHOTOS}
    assert list(rows) == list(PHOTOS)
    if with_lime:  # the drop-in's coefficients against lime's, printed as max|dcoef|
        assert all(float(cols[4]) < 1e-6 for cols in rows.values()), printed
    # The batched call segments the same uint8 photos: the same superpixel counts as each row.
    batched = re.search(r"batched API: .* segments \[([\d, ]+)\]", printed)
    assert batched and [int(v) for v in batched.group(1).split(",")] == [int(cols[0]) for cols in rows.values()]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.png" for name in PHOTOS)
    # lime's progress bar was quieted for its calls only: the process's other bars still show
    from tqdm import tqdm

    assert not tqdm(range(1), file=io.StringIO()).disable
