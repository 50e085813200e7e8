"""The model metrics of `phased-dmd evaluate`: DINO cosine (a tiny random transformers DINOv2 saved
here), LPIPS (random AlexNet and linear layers, against the distance written out below with
torch.nn.functional), and optical-flow motion (Farneback on textures moved by known shifts)."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from phased_dmd_mega.evaluation.arguments import FlowSpec, parse_flow
from phased_dmd_mega.evaluation.dino import DinoEmbedder, dino_cosine
from phased_dmd_mega.evaluation.errors import EvaluationError
from phased_dmd_mega.evaluation.lpips import load_lpips, lpips_pairwise
from phased_dmd_mega.evaluation.motion import check_flow, load_flow, motion_metrics, video_motion

from helpers.evaluation_models import alexnet_state, lin_state, save_tiny_dino, shifted_video

# torchvision's alexnet().features, as its state dict names and shapes them.
TORCHVISION_ALEXNET = {
    "features.0": (64, 3, 11, 11),
    "features.3": (192, 64, 5, 5),
    "features.6": (384, 192, 3, 3),
    "features.8": (256, 384, 3, 3),
    "features.10": (256, 256, 3, 3),
}
HAS_CV2 = importlib.util.find_spec("cv2") is not None


def _torchvision_imports() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def random_images(count, seed, size=(36, 40)):
    return torch.randint(0, 256, (count, 1, *size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- DINO


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    return DinoEmbedder.load(save_tiny_dino(tmp_path_factory.mktemp("dino")), batch_size=3)


def test_dino_cosine_is_one_for_identical_images_and_below_for_different(dino):
    same = random_images(1, 0).expand(3, -1, -1, -1, -1)
    assert dino_cosine(dino, same, [4, 4, 4]) == pytest.approx({4: 1.0}, abs=1e-6)
    different = random_images(4, 1)
    cosine = dino_cosine(dino, different, [0, 0, 1, 1])
    assert set(cosine) == {0, 1} and all(value < 1 - 1e-4 for value in cosine.values())


def test_dino_cosine_is_the_mean_cosine_of_the_pooled_outputs(dino):
    images = random_images(3, 2)
    pixels = dino.processor(images=[image.numpy() for image in images[:, 0]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        pooled = dino.model(pixel_values=pixels).pooler_output.double()
    pairs = [(0, 1), (0, 2), (1, 2)]
    want = sum(F.cosine_similarity(pooled[a], pooled[b], dim=0).item() for a, b in pairs) / 3
    assert dino_cosine(dino, images, [0, 0, 0])[0] == pytest.approx(want, abs=1e-6)


def test_dino_on_videos_compares_the_middle_frame_or_every_frame(dino):
    video = random_images(2, 3).expand(-1, 5, -1, -1, -1).clone()
    video[1, 2] = video[0, 2]  # same middle frame, other frames differ
    assert dino_cosine(dino, video, [0, 0], "middle")[0] == pytest.approx(1.0, abs=1e-6)
    assert dino_cosine(dino, video, [0, 0], "all")[0] < 1 - 1e-4


@pytest.mark.parametrize("missing", [None, "config.json", "preprocessor_config.json"])
def test_a_dino_path_without_a_model_is_refused_naming_the_option(tmp_path, missing):
    folder = tmp_path / "dino"
    if missing is not None:
        save_tiny_dino(folder)
        (folder / missing).unlink()
    with pytest.raises(EvaluationError, match="--dino") as err:
        DinoEmbedder.load(folder)
    assert (missing or "no such folder") in str(err.value)


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture
def lpips_files(tmp_path):
    torch.save(alexnet_state(), tmp_path / "alexnet.pth")
    torch.save(lin_state(), tmp_path / "alex.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex.pth"


def reference_lpips(a, b, features, lins):
    """LPIPS v0.1 written out: [-1, 1] inputs, fixed shift/scale, AlexNet's ReLUs, channel-unit
    features, squared difference, 1x1 weights, spatial mean, summed (float64)."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    w = {key: value.double() for key, value in features.items()}

    def taps(x):
        x = (x - shift) / scale
        out = []
        x = F.relu(F.conv2d(x, w["features.0.weight"], w["features.0.bias"], stride=4, padding=2))
        out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), w["features.3.weight"], w["features.3.bias"], padding=2))
        out.append(x)
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), w["features.6.weight"], w["features.6.bias"], padding=1))
        out.append(x)
        x = F.relu(F.conv2d(x, w["features.8.weight"], w["features.8.bias"], padding=1))
        out.append(x)
        out.append(F.relu(F.conv2d(x, w["features.10.weight"], w["features.10.bias"], padding=1)))
        return out

    total = 0.0
    for k, (fa, fb) in enumerate(zip(taps(a.double()), taps(b.double()))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((na - nb) ** 2 * lins[f"lin{k}.model.1.weight"].double()).sum(1).mean(dim=(1, 2))
    return total


def test_the_backbone_has_torchvisions_alexnet_feature_names_and_shapes():
    state = alexnet_state()
    shapes = {key.rsplit(".", 1)[0]: tuple(value.shape) for key, value in state.items() if key.endswith(".weight")}
    assert {key: shape for key, shape in shapes.items() if key.startswith("features.")} == TORCHVISION_ALEXNET


def test_lpips_is_zero_for_identical_images_and_matches_the_formula_otherwise(lpips_files):
    model = load_lpips(*lpips_files)
    same = random_images(1, 4, (48, 48)).expand(3, -1, -1, -1, -1)
    assert lpips_pairwise(model, same, [0, 0, 0]) == {0: 0.0}
    images = random_images(3, 5, (48, 48))
    got = lpips_pairwise(model, images, [2, 2, 2], batch_size=2)[2]
    x = images[:, 0].double().permute(0, 3, 1, 2) / 255 * 2 - 1
    want = reference_lpips(x[[0, 0, 1]], x[[1, 2, 2]], alexnet_state(), lin_state()).mean().item()
    assert got > 0 and got == pytest.approx(want, rel=1e-4)


def test_lpips_reads_one_file_holding_both_and_the_lpips_package_names(tmp_path, lpips_files):
    images = random_images(2, 6, (48, 48))
    want = lpips_pairwise(load_lpips(*lpips_files), images, [0, 0])[0]
    torch.save({**alexnet_state(), **lin_state()}, tmp_path / "both.pth")
    assert lpips_pairwise(load_lpips(tmp_path / "both.pth"), images, [0, 0])[0] == pytest.approx(want, rel=1e-6)
    slices = {1: (0, 1), 2: (2, 3, 4), 3: (5, 6, 7), 4: (8, 9), 5: (10, 11)}
    of_slice = {n: k for k, members in slices.items() for n in members}
    renamed = {
        f"net.slice{of_slice[int(key.split('.')[1])]}.{key.split('.', 1)[1]}": value
        for key, value in alexnet_state().items()
        if key.startswith("features.")
    }
    from safetensors.torch import save_file

    save_file({**renamed, **lin_state()}, str(tmp_path / "lpips.safetensors"))
    got = lpips_pairwise(load_lpips(tmp_path / "lpips.safetensors"), images, [0, 0])[0]
    assert got == pytest.approx(want, rel=1e-6)


def test_lpips_files_that_are_not_what_the_options_say_are_refused(tmp_path, lpips_files):
    backbone, weights = lpips_files
    with pytest.raises(EvaluationError, match="--lpips-weights"):
        load_lpips(backbone)  # no linear layers in the backbone file, none given
    with pytest.raises(EvaluationError, match="--lpips-backbone .*missing.pth: no such file"):
        load_lpips(tmp_path / "missing.pth", weights)
    with pytest.raises(EvaluationError, match="--lpips-weights .*missing.pth: no such file"):
        load_lpips(backbone, tmp_path / "missing.pth")
    with pytest.raises(EvaluationError, match="--lpips-backbone .*features"):
        load_lpips(weights, weights)  # linear layers only
    bad = alexnet_state()
    bad["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EvaluationError, match=r"features.3.weight is \[192, 64, 3, 3\]"):
        load_lpips(tmp_path / "bad.pth", weights)


@pytest.mark.skipif(
    not (_torchvision_imports() and importlib.util.find_spec("lpips")), reason="needs torchvision and lpips"
)
def test_lpips_matches_the_lpips_package(lpips_files):
    import lpips

    theirs = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    ours = load_lpips(*lpips_files)
    slices = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}  # lpips' alexnet slices
    backbone = {key: v for key, v in ours.state_dict().items() if key.startswith("net.features.")}
    theirs.net.load_state_dict(
        {f"slice{slices[int(k.split('.')[2])]}.{'.'.join(k.split('.')[2:])}": v for k, v in backbone.items()}
    )
    for k in range(5):
        getattr(theirs, f"lin{k}").model[1].weight.data.copy_(lin_state()[f"lin{k}.model.1.weight"])
    images = random_images(2, 7, (64, 64))
    x = images[:, 0].float().permute(0, 3, 1, 2) / 255 * 2 - 1
    want = theirs(x[:1], x[1:]).item()
    assert lpips_pairwise(ours, images, [0, 0])[0] == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------- motion


@pytest.mark.skipif(not HAS_CV2, reason="needs OpenCV: pip install 'phased-dmd-mega[evaluate]'")
def test_farneback_gives_zero_on_a_static_video_and_the_shift_on_a_moving_texture():
    farneback = load_flow(parse_flow("farneback"))
    static = shifted_video(4, 64, 80, 0)
    assert video_motion(farneback, static)["flow_magnitude"] == pytest.approx(0.0, abs=0.02)
    for shift in (1, 2, 3):
        motion = video_motion(farneback, shifted_video(4, 64, 80, shift, seed=shift))
        assert motion["flow_magnitude"] == pytest.approx(shift, rel=0.05)


@pytest.mark.skipif(not HAS_CV2, reason="needs OpenCV: pip install 'phased-dmd-mega[evaluate]'")
def test_dynamic_degree_is_the_share_of_videos_above_the_threshold():
    # 64-pixel frames: the top-5% flow is scaled by 256 / 64 = 4, so 1 px/frame -> 4, 2 -> 8.
    videos = torch.stack([shifted_video(3, 64, 80, shift, seed=shift) for shift in (0, 1, 2, 2)])
    metrics = motion_metrics(load_flow(FlowSpec("farneback")), videos, [0, 0, 1, 1], threshold=6.0)
    assert metrics["dynamic_degree"] == {0: 0.0, 1: 1.0}
    assert metrics["flow_top5"][1] == pytest.approx(8.0, rel=0.05)
    assert metrics["flow_magnitude"][0] == pytest.approx(0.5, rel=0.05)
    assert motion_metrics(load_flow(FlowSpec("farneback")), videos, [0, 0, 1, 1], 3.0)["dynamic_degree"][0] == 0.5


def test_flow_options_are_parsed_and_checked():
    assert parse_flow("farneback") == FlowSpec("farneback")
    assert str(parse_flow("raft:/w/raft.pth")) == "raft:/w/raft.pth"
    for bad in ("raft", "raft:", "lucas-kanade"):
        with pytest.raises(ValueError, match="neither farneback nor raft:PATH"):
            parse_flow(bad)
    with pytest.raises(EvaluationError, match="--flow raft:.*no such file"):
        check_flow(parse_flow("raft:/no/such/raft.pth"))


@pytest.mark.skipif(_torchvision_imports(), reason="torchvision imports here: the refusal cannot be seen")
def test_raft_without_torchvision_is_refused_naming_it(tmp_path):
    (tmp_path / "raft.pth").write_bytes(b"")
    with pytest.raises(EvaluationError, match="needs torchvision"):
        check_flow(parse_flow(f"raft:{tmp_path / 'raft.pth'}"))


@pytest.mark.skipif(
    not _torchvision_imports(), reason="torchvision does not import beside this torch build: RAFT cannot run here"
)
def test_raft_small_loads_local_weights_and_measures_videos(tmp_path):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), tmp_path / "raft_small.pth")
    raft = load_flow(parse_flow(f"raft:{tmp_path / 'raft_small.pth'}"), batch_size=2)
    flows = raft.pairs(shifted_video(3, 60, 84, 2))  # not multiples of 8: padded and cropped back
    assert len(flows) == 2 and flows[0].shape == (60, 84, 2)
    assert all(torch.isfinite(torch.from_numpy(flow)).all() for flow in flows)
