"""Configs agree with each other where they must: one network definition, one preprocessing chain."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CONFIGS = ["train.json", "inference.json"]


def load(bundle_root, name):
    return json.loads((bundle_root / "configs" / name).read_text())


def test_every_config_is_valid_json(bundle_root):
    for path in sorted((bundle_root / "configs").glob("*.json")):
        json.loads(path.read_text())


@pytest.mark.parametrize("name", ["multi_gpu_train.json", "multi_gpu_evaluate.json", "mgpu_inference.json"])
def test_distributed_configs_start_and_end_the_group_as_scripts_distributed_says(bundle_root, name):
    """The modules that would hold the group are imported before it starts; the end helper waits for every rank
    and leaves no group behind to abort a rank at exit (tests/test_distributed.py); a config that trains a
    DistributedDataParallel wrapper hands it over."""
    from scripts.distributed import BIND_GROUP_AT_IMPORT

    config = load(bundle_root, name)
    start = [i for i, step in enumerate(config["initialize"]) if "init_process_group" in step]
    imports = [i for i, step in enumerate(config["initialize"]) if step == "$import " + ", ".join(BIND_GROUP_AT_IMPORT)]
    assert imports and start and imports[0] < start[0], config["initialize"]
    (end,) = config["finalize"]
    assert end["_target_"] == "scripts.distributed.end_process_group"
    wraps = config.get("network", {}).get("_target_") == "torch.nn.parallel.DistributedDataParallel"
    assert end.get("network") == ("@network" if wraps else None), end


def test_train_and_inference_define_the_same_network(bundle_root):
    """Deep supervision is training-only (its modules load either way), the rest of the definition is shared."""
    train, infer = (load(bundle_root, name) for name in CONFIGS)
    assert train["network_def"].pop("deep_supervision") == "@deep_supervision" and train["deep_supervision"] == 0
    assert train["network_def"] == infer["network_def"]
    assert train["num_tasks"] == infer["num_tasks"] == 7


@pytest.mark.parametrize("name", CONFIGS)
def test_preprocessing_comes_from_the_shared_chain(bundle_root, name):
    config = load(bundle_root, name)
    assert config["preprocessing_steps"]["_target_"] == "scripts.data.ct_preprocessing"
    targets = set()

    def collect(node):
        if isinstance(node, dict):
            targets.add(str(node.get("_target_", "")).rsplit(".", 1)[-1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(config)
    for step in ("Spacingd", "ScaleIntensityRanged", "Orientationd", "LoadImaged"):
        assert (
            step not in targets
        ), f"{name} defines {step} itself instead of using scripts.data.transforms.ct_preprocessing"


def test_inference_lets_cudnn_pick_its_fastest_kernels_after_seeding(bundle_root, monkeypatch):
    """``set_determinism`` switches cuDNN's autotuner off; inference turns it back on (``cudnn_benchmark``)."""
    import torch
    from monai.bundle import ConfigParser

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.get_parsed_content("initialize")  # evaluates the expressions in order
    assert torch.backends.cudnn.benchmark is True
    parser["cudnn_benchmark"] = False
    parser.parse(True)
    parser.get_parsed_content("initialize")
    assert torch.backends.cudnn.benchmark is False


def test_inference_stitches_on_the_network_gpu_and_hands_masks_to_the_cpu(bundle_root):
    """Adaptive stitching by default (GPU when the network is on one); ``stitch_device`` forces a device and, on
    the host pipeline, the thresholded masks (and kept probabilities) are moved to host memory before the CPU
    post-processing; on the GPU-resident pipeline only the results, after the inversion."""
    import torch
    from monai.bundle import ConfigParser

    from scripts.inference import PipelineToDeviced, PipelineToHostd

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser["device"] = "$torch.device('cpu')"
    inferer = parser.get_parsed_content("inferer")
    assert inferer.device is None and inferer.cpu_thresh is None
    image = torch.zeros(1, 1, 8, 8, 8)
    inferer.sw_device = torch.device("cuda")  # a device object is all the decision needs (no GPU here)
    assert inferer._stitch_input_device(image).type == "cuda"
    steps = parser.get_parsed_content("postprocessing_steps")
    threshold = next(i for i, s in enumerate(steps) if "Lambdad" in type(s).__name__)
    move, last = steps[threshold + 1], steps[-1]
    assert isinstance(move, PipelineToHostd) and set(move.keys) == {"pred", "prob"} and move.when == "host_pipeline"
    assert isinstance(last, PipelineToHostd) and last.when == "gpu_pipeline"
    assert set(last.keys) == {"pred", "pred_grid"}  # masks and probabilities: inverted by the writer per channel
    pipeline = parser.get_parsed_content("pipeline_device")
    assert pipeline.resident is False and move.pipeline is pipeline and last.pipeline is pipeline
    to_device = [t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, PipelineToDeviced)]
    assert len(to_device) == 1 and to_device[0].pipeline is pipeline
    assert parser.get_parsed_content("evaluator").pipeline_device is pipeline
    parser["stitch_device"] = "cpu"
    parser["stitch_cpu_voxels"] = 1000
    parser.parse(True)
    inferer = parser.get_parsed_content("inferer")
    inferer.sw_device = torch.device("cuda")
    assert inferer.device == "cpu" and inferer.cpu_thresh == 1000
    assert inferer._stitch_input_device(image).type == "cpu"  # forced CPU stitching: the input stays


@pytest.mark.parametrize("device, sw_batch_size, channels_last", [("cpu", 1, True), ("cuda", 2, False)])
def test_inference_defaults_follow_the_device(bundle_root, device, sw_batch_size, channels_last):
    """Measured defaults (docs/README.md, Performance): channels-last only on the CPU (on an H100 it made the
    forward 33% slower: GroupNorm's CUDA kernel converts the layout back); 2 windows per call on a GPU; the
    pipeline is GPU-resident on CUDA only."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser["device"] = f"$torch.device('{device}')"
    assert parser.get_parsed_content("sw_batch_size") == sw_batch_size
    assert parser.get_parsed_content("channels_last") is channels_last
    assert parser.get_parsed_content("pipeline_device").resident is (device == "cuda")  # GPU-resident on CUDA
    parser["device"] = device  # a plain string (a command-line override) works as well
    parser.parse(True)
    assert parser.get_parsed_content("channels_last") is channels_last
    assert parser.get_parsed_content("pipeline_device").resident is (device == "cuda")


@pytest.mark.parametrize("package", ["data", "training", "inference", "evaluation"])
def test_package_exports_are_their_modules_public_names(package):
    """scripts.<package>.<Name> (the form configs use) is the module's object for every name of its __all__."""
    import importlib

    pkg = importlib.import_module(f"scripts.{package}")
    assert pkg._EXPORTS and sorted(pkg._EXPORTS) == pkg.__all__
    for name, module in pkg._EXPORTS.items():
        mod = importlib.import_module(f"scripts.{package}.{module}")
        assert name in mod.__all__ and getattr(pkg, name) is getattr(mod, name)
    for module in set(pkg._EXPORTS.values()):
        mod = importlib.import_module(f"scripts.{package}.{module}")
        assert set(mod.__all__) <= set(pkg._EXPORTS), f"{mod.__name__}.__all__ not all exported"
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        getattr(pkg, "NoSuchName")


def test_every_config_target_of_the_bundle_resolves(bundle_root):
    """Each scripts.* _target_ in the configs names an existing component (MONAI resolves them with pydoc.locate)."""
    import re
    from pydoc import locate

    targets = set()
    for path in (bundle_root / "configs").glob("*.json"):
        targets |= set(re.findall(r'"_target_": "(scripts\.[\w.]+)"', path.read_text()))
    assert targets
    missing = sorted(t for t in targets if locate(t) is None)
    assert not missing, missing


def test_stage_packages_import_without_torch(bundle_root):
    code = (
        "import sys; import scripts.data, scripts.training, scripts.inference, scripts.evaluation, scripts.tasks;"
        "import scripts.data.synth, scripts.data.prepare_mots, scripts.utils;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=bundle_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
