"""The README's library example runs exactly as printed, and its numbers are sane."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## Use it as a library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(README.parent / "recipes")
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    assert 0.0 <= scope["ci"].lo <= scope["ci"].estimate <= scope["ci"].hi <= 1.0
    # the Trainer's predictions cover the test set exactly once
    assert sorted(scope["out"]["index"]) == list(range(len(scope["test"])))
    res = scope["results"]
    macro = res.query("metric == 'auroc' and label == 'macro' and attribute == 'all'")
    assert set(macro.eval_set) == {"val", "test", "ood_site_b"}  # val: in-sample where a fit is involved
    assert "Edema AUROC" in capsys.readouterr().out
