"""The README's "From Python" snippet runs as printed (on a small pack: only the data path, the
batch size and the epoch count are scaled down), and the README gives the demo's time once."""
import os
import re
import warnings

from helpers import ROOT, make_imagenet
from engine.data.loader import KeptBatchWarning
from engine.data.pack import pack_imagenet


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def from_python_snippet() -> str:
    section = readme().split("### From Python", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_from_python_snippet_runs(tmp_path):
    root = make_imagenet(str(tmp_path / "raw"), classes=2, train=5, val=1)
    pack_imagenet(root, str(tmp_path / "packed"), workers=0, progress=False, log=lambda s: None)
    code = from_python_snippet()
    for old, new in (('"/data/imagenet-lmdb/train"', repr(str(tmp_path / "packed" / "train"))),
                     ("batch_size=256", "batch_size=4"), ("range(90)", "range(2)")):
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", KeptBatchWarning)
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["state"] == {"epoch": 2, "position": 0}
    assert scope["step"] == 2 * len(scope["loader"]) and scope["images"].shape == (4, 3, 224, 224)


def test_the_demo_time_is_given_once():
    text = readme()
    assert "about 10 minutes" not in text
    assert len(re.findall(r"the demo ran in \d+ s", text)) == 1
    assert not re.search(r"make demo[^\n]*(minutes|\d+ s\b)", text)
