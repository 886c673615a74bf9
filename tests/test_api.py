"""The package as a user meets it: the public names, one import graph without circles, the random streams."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import atomdistill as ad
from atomdistill.rng import Stream, derived_seed

PACKAGE = Path(ad.__file__).parent


def test_public_names_after_a_plain_import():
    code = ("import atomdistill as ad\n"
            "names = ['load_dataset', 'distill', 'evaluate', 'evaluation_record', 'full_training_set', 'resume',\n"
            "         'build_model', 'list_models', 'select_coreset', 'SyntheticSet', 'EvalProtocol',\n"
            "         'import_set', 'export_set']\n"
            "assert all(callable(getattr(ad, n)) for n in names)\n"
            "assert sorted(ad.__all__) == sorted(set(ad.__all__))\n"
            "assert all(hasattr(ad, n) for n in ad.__all__)\n"
            "print(ad.evaluate.__module__, ad.distill.__module__)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["atomdistill.evaluate", "atomdistill.distill"]


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("atomdistill."):
                found.add(node.module.split(".")[1])
    return found - {"__init__"}


def test_the_import_graph_has_no_circle():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join(path + [module])}"
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            visit(dep, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
    assert "evaluate" in graph["distill"] and "distill" not in graph["evaluate"]


def test_stream_numbers_are_pinned_and_distinct():
    # The numbers are part of every result: changing one changes the sets or accuracies drawn from it.
    assert {s.name: int(s) for s in Stream} == {"NET": 1, "REAL": 2, "DSA": 3, "INIT": 4, "POOL_PICK": 11,
                                                "POOL_BATCH": 12, "EVAL_NET": 101,
                                                "EVAL_SHUFFLE": 102, "EVAL_DSA": 103, "EMBED_NET": 201,
                                                "EMBED_SHUFFLE": 202}
    # Why distinct numbers matter: trailing zeros do not change a seed, so (s, 101) is (s, 101, 0).
    assert derived_seed(0, 101) == derived_seed(0, 101, 0)
    assert derived_seed(0, Stream.EMBED_NET) != derived_seed(0, Stream.EVAL_NET, 0)


def test_no_module_points_outside_the_repository():
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        assert "CONTEXT.md" not in text, path


def test_evaluate_takes_a_path_and_a_dataset_name_and_refuses_other_types(tmp_path):
    # ad.evaluate(s, "digits") ended in "'str' object has no attribute 'mean'"; the names work now,
    # and any other type is one ConfigError.
    import pytest
    digits = ad.load_dataset("digits")
    s = ad.distill(digits, ipc=1, iterations=0, progress=False)
    s.save(tmp_path / "s.safetensors")
    by_objects = ad.evaluate(s, digits, runs=1, epochs=1, progress=False)["convnet"]["accs"]
    assert ad.evaluate(tmp_path / "s.safetensors", "digits", runs=1, epochs=1, progress=False)["convnet"]["accs"] == by_objects
    with pytest.raises(ad.ConfigError, match="takes a SyntheticSet .* got int and ImageDataset"):
        ad.evaluate(3, digits)
    with pytest.raises(ad.ConfigError, match="dataset must be a name .* got int"):
        ad.distill(123, ipc=1, progress=False)
    with pytest.raises(ad.ConfigError, match="unknown device 'gpu'; use auto, cpu, cuda or cuda:N"):
        ad.distill("digits", ipc=1, iterations=1, device="gpu", progress=False)


def test_import_export_and_coresets_from_python_take_a_dataset_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synset = ad.select_coreset("digits", 2, "random")
    ad.export_set(synset, "dc", "res.pt")
    back = ad.import_set("res.pt", "dc", "digits", zca=False)
    assert torch.equal(back.synset.images, synset.images) and torch.equal(back.synset.labels, synset.labels)
    with pytest.raises(ad.ConfigError, match="import_set needs the dataset .* got int"):
        ad.import_set("res.pt", "dc", 10, zca=False)
    with pytest.raises(ad.ConfigError, match="select_coreset needs an ImageDataset or a dataset name, got int"):
        ad.select_coreset(10, 2)   # was "'int' object has no attribute 'class_indices'"


def test_a_cuda_device_that_is_not_there_is_named(monkeypatch):
    from atomdistill.runtime import resolve_device
    if not torch.cuda.is_available():
        with pytest.raises(ad.ConfigError, match="--device cuda:3 was asked for but no CUDA GPU is visible"):
            resolve_device("cuda:3")
    # On a machine with two GPUs, cuda:3 failed later inside torch ("invalid device ordinal").
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ad.ConfigError, match=r"--device cuda:3 was asked for but 2 CUDA GPUs are visible "
                                             r"\(cuda:0 to cuda:1\)"):
        resolve_device("cuda:3")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
