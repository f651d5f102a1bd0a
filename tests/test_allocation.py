"""Global allocation: synthetic layers with planted, different redundancy; the split's budget and bounds; resume."""
import math

import pytest
import torch

from sslc_export.allocation import Allocation, LossCurve, allocate, measure_curve
from sslc_export.budget import plan_budget, split_budget
from sslc_export.calibration import InputStatistics
from sslc_export.errors import UserError
from sslc_export.methods import METHODS, Settings
from sslc_export.patterns import Pattern
from conftest import interrupted_after_first_block
from test_pipeline import small_job

M, N = 96, 64
RATIO = 0.5


@pytest.fixture(scope="module")
def planted_layers():
    """Three layers of one shape that differ in how much they can lose: a sparse one (12 % nonzeros), an exactly
    rank-3 one and pure noise, all seen through inputs with uneven column scales."""
    torch.manual_seed(0)
    inputs = torch.randn(1024, N) * (0.2 + 2 * torch.rand(N))
    stats = InputStatistics(N)
    stats.add_batch(inputs)
    layers = {
        "sparse": torch.randn(M, N) * (torch.rand(M, N) < 0.12),
        "low_rank": torch.randn(M, 3) @ torch.randn(3, N),
        "noise": torch.randn(M, N),
    }
    return layers, stats


def sslc_settings():
    method = METHODS["sslc"]
    return method, method.resolve(Settings(rank_ratio=0.3, iters=20), Pattern())


def total_loss(layers, stats, budgets, method, settings):
    """Σ relative loss² of the full decomposition of each layer at its budget, and the parameters it kept."""
    loss, kept = 0.0, 0
    for name, weight in layers.items():
        result = method.decompose(weight, stats, budgets[name], Pattern(), settings)
        loss += stats.relative_error(weight, result.dense()) ** 2
        kept += result.rank * sum(weight.shape) + int(result.mask.sum())
    return loss, kept


def test_global_split_beats_uniform_at_the_same_budget(planted_layers):
    layers, stats = planted_layers
    method, settings = sslc_settings()
    allocation = Allocation("global", 0.2, 0.9)
    curves = {name: measure_curve(method, weight, stats, RATIO, allocation, Pattern(), settings) for name, weight in layers.items()}
    budget = math.floor((1 - RATIO) * M * N * len(layers))
    kept = allocate(curves, budget)
    assert sum(kept.values()) == budget
    assert kept["noise"] > kept["low_rank"] and kept["noise"] > kept["sparse"]  # the incompressible layer gets the most
    global_budgets = {name: split_budget(M, N, kept[name], method.rank_ratio(settings), Pattern()) for name in layers}
    uniform_budgets = {name: plan_budget(M, N, RATIO, method.rank_ratio(settings), Pattern()) for name in layers}
    global_loss, global_kept = total_loss(layers, stats, global_budgets, method, settings)
    uniform_loss, uniform_kept = total_loss(layers, stats, uniform_budgets, method, settings)
    assert global_kept <= budget and uniform_kept <= budget
    assert global_loss < 0.8 * uniform_loss
    for name, b in global_budgets.items():  # each layer within its own share and its bounds
        assert b.params_kept <= b.allowed == kept[name]
        assert math.floor(0.2 * M * N) <= b.allowed <= math.floor(0.9 * M * N)


def curve(losses, keeps=(0.2, 0.35, 0.5, 0.65, 0.9), size=1000):
    return LossCurve((size, 1), [math.floor(keep * size) for keep in keeps], list(losses))


def test_allocate_spends_exactly_the_budget_within_the_measured_bounds():
    curves = {"steep": curve([0.9, 0.5, 0.2, 0.1, 0.05]), "flat": curve([0.11, 0.1, 0.09, 0.085, 0.08]),
              "mid": curve([0.5, 0.35, 0.25, 0.19, 0.1])}
    for budget in (600, 1500, 2000, 2699):
        kept = allocate(curves, budget)
        assert sum(kept.values()) == budget
        assert all(200 <= value <= 900 for value in kept.values())
    kept = allocate(curves, 1400)
    assert kept["steep"] > kept["mid"] > kept["flat"]
    assert allocate(curves, 5000) == {name: 900 for name in curves}  # every layer at its upper bound: budget left unused
    with pytest.raises(UserError, match="--min-keep"):
        allocate(curves, 599)


def test_allocate_skips_a_point_above_the_convex_hull():
    """A middle point that saves less than the chord (a bad measurement or a knee) is never a stopping place."""
    bumpy = curve([0.9, 0.85, 0.3, 0.25, 0.2])  # 0.35 barely helps, 0.5 a lot: the hull goes 0.2 -> 0.5 directly
    other = curve([0.5, 0.45, 0.4, 0.35, 0.3])
    kept = allocate({"bumpy": bumpy, "other": other}, 200 + 200 + 300)
    assert kept["bumpy"] == 500


def test_allocation_bounds_are_checked():
    Allocation("global", 0.2, 0.9).check(RATIO)
    Allocation("uniform", 0.6, 0.9).check(RATIO)  # bounds only bind a global split
    for bad in (Allocation("global", 0.6, 0.9), Allocation("global", 0.2, 0.4), Allocation("global", 0.2, 1.0),
                Allocation("global", 0.0, 0.9), Allocation("layerwise")):
        with pytest.raises(UserError, match="allocation"):
            bad.check(RATIO)
    assert Allocation().record() is None  # uniform leaves the fingerprint as it was before the option
    assert Allocation("global", 0.2, 0.9).keeps(RATIO) == [0.2, 0.35, 0.5, 0.65, 0.9]


def test_global_checkpoint_records_each_layers_split(tiny_llama, tmp_path):
    from sslc_export.checkpoint import read_manifest
    from sslc_export.compress import compress

    allocation = Allocation("global", 0.3, 0.8)
    manifest = compress(small_job(tiny_llama, tmp_path / "global", allocation=allocation)).manifest
    assert read_manifest(tmp_path / "global")["allocation"]["layers"] == manifest["allocation"]["layers"]
    budget = math.floor(0.5 * manifest["params_total"])
    assert manifest["allocation"]["budget"] == budget == sum(manifest["allocation"]["layers"].values())
    assert manifest["params_kept"] <= budget
    ratios = {layer["ratio"] for layer in manifest["layers"]}
    assert len(ratios) > 1 and all(0.2 - 1e-3 <= ratio <= 0.7 + 1e-3 for ratio in ratios)  # floor(keep·m·n) on small layers
    for layer in manifest["layers"]:
        assert layer["params_allowed"] == manifest["allocation"]["layers"][layer["name"]]
        assert layer["rank"] * sum(layer["shape"]) + layer["nnz"] == layer["params_kept"] <= layer["params_allowed"]


def test_resume_keeps_the_split_it_started_with(tiny_llama, tmp_path, monkeypatch):
    import sslc_export.compress as compress_module

    job = lambda out, **extra: small_job(tiny_llama, out, method="wanda", allocation=Allocation("global", 0.3, 0.8), **extra)
    reference = compress_module.compress(job(tmp_path / "reference")).manifest
    interrupted_after_first_block(lambda: compress_module.compress(job(tmp_path / "resumed")))

    def no_second_measurement(*_args, **_kwargs):
        raise AssertionError("a resumed run measured the loss curves again")

    monkeypatch.setattr(compress_module, "measure_curve", no_second_measurement)
    resumed = compress_module.compress(job(tmp_path / "resumed", resume=True)).manifest
    assert resumed["allocation"]["layers"] == reference["allocation"]["layers"]
    for name in reference["files"]:
        if name.startswith("blocks/"):
            assert reference["files"][name]["sha256"] == resumed["files"][name]["sha256"], name


def test_allocate_gives_more_to_the_layer_the_model_is_more_sensitive_to():
    """Two layers with the same measured curve: the one whose output error costs the model more keeps more."""
    curve = dict(shape=(M, N), kept=[1000, 2000, 3000, 4000], losses=[0.6, 0.35, 0.2, 0.1])
    kept = allocate({"quiet": LossCurve(**curve, weight=1.0), "loud": LossCurve(**curve, weight=10.0)}, 5000)
    assert kept["loud"] > kept["quiet"] and sum(kept.values()) == 5000


def test_output_weights_are_zero_where_the_loss_cannot_see_the_error(tiny_llama):
    """Block 0's attention with o_proj zeroed: q, k, v and o outputs reach nothing (or are nothing), so their
    errors cost the loss nothing; every other Linear gets a positive weight."""
    from sslc_export.models.loading import load_model
    from sslc_export.sensitivity import output_weights

    loaded = load_model(str(tiny_llama))
    architecture = loaded.architecture
    blocks = architecture.blocks(loaded.model)
    with torch.no_grad():
        blocks[0].get_submodule("self_attn.o_proj").weight.zero_()
    linears = {f"{index}.{name}": block.get_submodule(name) for index, block in enumerate(blocks) for name in architecture.linear_names}
    tokens = torch.randint(0, loaded.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    weights = output_weights(loaded.model, linears, tokens)
    silent = {f"0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert all(weights[name] == 0 for name in silent), weights
    assert all(weight > 0 for name, weight in weights.items() if name not in silent), weights
    assert not any(parameter.grad is not None for parameter in loaded.model.parameters())  # nothing trained or kept


def test_output_weights_leave_no_autograd_graph_behind(tiny_llama):
    """With the garbage collector off, nothing of the backward passes survives them: a gradient hook that held its
    output tensor made reference cycles that kept every sequence's graph alive."""
    import gc

    from sslc_export.models.loading import load_model
    from sslc_export.sensitivity import output_weights

    loaded = load_model(str(tiny_llama))
    blocks = loaded.architecture.blocks(loaded.model)
    linears = {f"{index}.{name}": block.get_submodule(name) for index, block in enumerate(blocks)
               for name in loaded.architecture.linear_names}
    tokens = torch.randint(0, loaded.model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))

    def tensors() -> int:
        return sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = tensors()
        output_weights(loaded.model, linears, tokens)
        left = tensors() - before
    finally:
        gc.enable()
    assert left == 0, f"{left} tensors kept alive by reference cycles"


def test_global_allocation_refuses_streaming():
    with pytest.raises(UserError, match="--streaming"):
        Allocation("global", 0.3, 0.8).check(RATIO, streaming=True)
