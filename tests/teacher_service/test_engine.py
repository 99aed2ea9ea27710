"""Tests for the masked teacher engine on small random-weight timm ViTs."""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch

from teacher_service.checkpoint import load_teacher, spec_from_model
from teacher_service.engine import MaskedTeacher, check_supported

IMG_SIZE = 32
PATCH_SIZE = 8
NUM_PATCHES = (IMG_SIZE // PATCH_SIZE) ** 2  # 16
SMALL: dict[str, Any] = {
    "img_size": IMG_SIZE,
    "patch_size": PATCH_SIZE,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 10,
}

# (test id, timm name, extra kwargs): one model per way of handling prefix tokens.
TEACHERS: list[tuple[str, str, dict[str, Any]]] = [
    ("class_token_pos", "vit_tiny_patch16_224", {}),
    ("no_embed_class", "deit3_small_patch16_224", {}),
    ("register_tokens", "vit_tiny_patch16_224", {"reg_tokens": 4, "no_embed_class": True}),
    ("distilled", "deit_tiny_distilled_patch16_224", {}),
    ("avg_pool", "vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}),
]
TEACHER_IDS = [case[0] for case in TEACHERS]

_ENGINES: dict[str, MaskedTeacher] = {}


def make_engine(case_id: str) -> MaskedTeacher:
    """Build (once per test session) a small random-weight teacher for a case."""
    if case_id not in _ENGINES:
        _, name, extra = next(case for case in TEACHERS if case[0] == case_id)
        torch.manual_seed(0)
        model, spec = load_teacher(name, random_init=True, model_kwargs={**SMALL, **extra})
        _ENGINES[case_id] = MaskedTeacher(model, spec)
    return _ENGINES[case_id]


@pytest.fixture(params=TEACHER_IDS)
def engine(request: pytest.FixtureRequest) -> MaskedTeacher:
    return make_engine(request.param)


@pytest.fixture
def vit() -> MaskedTeacher:
    return make_engine("class_token_pos")


def random_images(batch_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(
        0, 256, (batch_size, 3, IMG_SIZE, IMG_SIZE), dtype=torch.uint8, generator=generator
    )


def random_keep(batch_size: int, keep_count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = [
        torch.randperm(NUM_PATCHES, generator=generator)[:keep_count] for _ in range(batch_size)
    ]
    return torch.stack(rows)


def timm_logits(engine: MaskedTeacher, images: torch.Tensor) -> torch.Tensor:
    """Reference: the plain timm forward on images normalised by hand."""
    mean = torch.tensor(engine.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(engine.spec.std).view(1, -1, 1, 1)
    pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    with torch.no_grad():
        return engine.model((pixels - mean) / std)


def token_selection_logits(
    engine: MaskedTeacher, images: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Reference for masking: timm's own embedding of all patches, then drop tokens."""
    model = engine.model
    mean = torch.tensor(engine.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(engine.spec.std).view(1, -1, 1, 1)
    num_prefix = model.num_prefix_tokens
    with torch.no_grad():
        x = model.patch_embed((images.float() / 255.0 - mean) / std)
        x = model._pos_embed(x)  # [B, num_prefix + N, D]
        rows = []
        for row, row_keep in enumerate(keep):
            token_ids = torch.cat([torch.arange(num_prefix), num_prefix + row_keep])
            rows.append(x[row, token_ids])
        x = model.norm(model.blocks(model.norm_pre(torch.stack(rows))))
        return model.forward_head(x)


def test_keep_all_matches_timm_uint8(engine: MaskedTeacher) -> None:
    images = random_images(4)
    difference = (engine.forward_images(images) - timm_logits(engine, images)).abs().max()
    assert difference <= 1e-5


def test_keep_all_matches_timm_float(engine: MaskedTeacher) -> None:
    images = random_images(4).float() / 255.0
    difference = (engine.forward_images(images) - timm_logits(engine, images)).abs().max()
    assert difference <= 1e-5


def test_keep_every_index_matches_keep_none(engine: MaskedTeacher) -> None:
    images = random_images(3)
    keep = random_keep(3, NUM_PATCHES)
    difference = (engine.forward_images(images, keep) - engine.forward_images(images)).abs()
    assert difference.max() <= 1e-5


def test_masked_matches_timm_token_selection(engine: MaskedTeacher) -> None:
    images = random_images(4, seed=1)
    keep = random_keep(4, 7, seed=1)
    expected = token_selection_logits(engine, images, torch.sort(keep, dim=1).values)
    difference = (engine.forward_images(images, keep) - expected).abs().max()
    assert difference <= 1e-5


def test_masking_changes_logits(vit: MaskedTeacher) -> None:
    images = random_images(2)
    masked = vit.forward_images(images, random_keep(2, 4))
    assert not torch.allclose(masked, vit.forward_images(images), atol=1e-3)


def test_kept_pixels_match_full_images(engine: MaskedTeacher) -> None:
    images = random_images(4, seed=2)
    keep = random_keep(4, 9, seed=2)
    patches = engine.gather_patches(images, keep)
    assert patches.shape == (4, 9, engine.patch_dim)
    assert patches.dtype == torch.uint8
    assert torch.equal(engine.forward_patches(patches, keep), engine.forward_images(images, keep))


def test_kept_float16_pixels_match_full_images(vit: MaskedTeacher) -> None:
    images = (random_images(2).float() / 255.0).half()
    keep = random_keep(2, 5)
    from_patches = vit.forward_patches(vit.gather_patches(images, keep), keep)
    assert torch.equal(from_patches, vit.forward_images(images, keep))


def test_index_order_within_row_is_irrelevant(engine: MaskedTeacher) -> None:
    images = random_images(3, seed=3)
    keep = random_keep(3, 6, seed=3)
    shuffled = torch.stack([row[torch.randperm(row.numel())] for row in keep])
    assert not torch.equal(shuffled, keep)
    expected = engine.forward_images(images, keep)
    assert torch.equal(engine.forward_images(images, shuffled), expected)
    shuffled_patches = engine.gather_patches(images, shuffled)
    assert torch.equal(engine.forward_patches(shuffled_patches, shuffled), expected)


def test_mixed_counts_match_separate_calls(engine: MaskedTeacher) -> None:
    images = random_images(5, seed=4)
    counts = [3, 16, 3, 8, 1]
    keep = [random_keep(1, count, seed=row)[0] for row, count in enumerate(counts)]
    logits = engine.forward_images(images, keep)
    assert logits.shape == (5, engine.num_classes)
    for row in range(5):
        alone = engine.forward_images(images[row : row + 1], keep[row].unsqueeze(0))
        assert (logits[row] - alone[0]).abs().max() <= 1e-5, f"row {row}"


def test_mixed_counts_patches_match_images(vit: MaskedTeacher) -> None:
    images = random_images(4, seed=5)
    keep = [random_keep(1, count, seed=count)[0] for count in (2, 5, 2, 16)]
    patches = [
        vit.gather_patches(images[row : row + 1], keep[row].unsqueeze(0))[0] for row in range(4)
    ]
    from_patches = vit.forward_patches(patches, keep)
    assert torch.equal(from_patches, vit.forward_images(images, keep))


def test_output_is_plain_float32_tensor(vit: MaskedTeacher) -> None:
    logits = vit.forward_images(random_images(2), random_keep(2, 4))
    assert logits.dtype == torch.float32
    assert logits.shape == (2, 10)
    # Callers may use teacher logits in autograd graphs, which inference tensors forbid.
    assert not logits.is_inference()


def test_patchify_layout(vit: MaskedTeacher) -> None:
    images = random_images(2)
    patches = vit.patchify(images)
    grid_w = IMG_SIZE // PATCH_SIZE
    assert patches.shape == (2, NUM_PATCHES, 3 * PATCH_SIZE * PATCH_SIZE)
    for index in (0, 5, NUM_PATCHES - 1):
        row, col = divmod(index, grid_w)
        top, left = row * PATCH_SIZE, col * PATCH_SIZE
        block = images[:, :, top : top + PATCH_SIZE, left : left + PATCH_SIZE]
        assert torch.equal(patches[:, index], block.reshape(2, -1)), f"patch {index}"


def test_gather_matches_patchify(vit: MaskedTeacher) -> None:
    images = random_images(3)
    keep = random_keep(3, 5)
    expected = torch.stack([vit.patchify(images)[row, keep[row]] for row in range(3)])
    assert torch.equal(vit.gather_patches(images, keep), expected)


def test_macs_formula(vit: MaskedTeacher) -> None:
    embed_dim, depth, num_classes = 64, 2, 10
    patch_dim = 3 * PATCH_SIZE * PATCH_SIZE
    for keep_count in (1, 8, NUM_PATCHES):
        tokens = 1 + keep_count
        per_block = tokens * 12 * embed_dim**2 + 2 * tokens**2 * embed_dim
        expected = keep_count * patch_dim * embed_dim + depth * per_block + embed_dim * num_classes
        assert vit.macs_per_image(keep_count) == expected, f"keep_count {keep_count}"
    assert vit.full_macs_per_image == vit.macs_per_image(NUM_PATCHES)


def test_macs_at_half_kept_for_vit_base() -> None:
    model = timm.create_model("vit_base_patch16_224", depth=1)
    engine = MaskedTeacher(
        model, spec_from_model(model, arch="vit_base_patch16_224", model_kwargs={})
    )
    ratio = engine.macs_per_image(98) / engine.full_macs_per_image
    # Half the tokens halve the linear layers and quarter the attention matmuls.
    assert 0.45 < ratio < 0.5


@pytest.mark.parametrize("keep_count", [0, NUM_PATCHES + 1, -3])
def test_macs_rejects_bad_count(vit: MaskedTeacher, keep_count: int) -> None:
    with pytest.raises(ValueError, match=str(keep_count)):
        vit.macs_per_image(keep_count)


# (test id, images, keep, pattern the message must contain)
BAD_INPUTS: list[tuple[str, Any, Any, str]] = [
    ("index_out_of_range", random_images(2), torch.tensor([[0, 1], [2, 16]]), "16"),
    ("negative_index", random_images(2), torch.tensor([[0, -1], [2, 3]]), "-1"),
    ("duplicate_index", random_images(2), torch.tensor([[0, 1], [7, 7]]), "7"),
    ("zero_kept", random_images(2), torch.empty(2, 0, dtype=torch.long), "empty"),
    ("ragged_2d_row", random_images(2), [torch.tensor([1]), torch.tensor([[1, 2]])], "1-D"),
    (
        "zero_kept_ragged",
        random_images(2),
        [torch.tensor([1]), torch.tensor([], dtype=torch.long)],
        "empty",
    ),
    ("float_indices", random_images(1), torch.tensor([[0.0, 1.0]]), "float32"),
    ("keep_rows_mismatch", random_images(2), torch.tensor([[0, 1]]), r"\(1, 2\)"),
    ("wrong_image_size", torch.zeros(1, 3, 28, 28, dtype=torch.uint8), None, "28"),
    ("wrong_channels", torch.zeros(1, 1, 32, 32, dtype=torch.uint8), None, r"\(1, 1, 32, 32\)"),
    ("nan_pixel", torch.full((1, 3, 32, 32), float("nan")), None, "nan"),
    ("inf_pixel", torch.full((1, 3, 32, 32), float("inf")), None, "inf"),
    ("pixels_over_one", torch.full((1, 3, 32, 32), 255.0), None, "255"),
    ("negative_pixels", torch.full((1, 3, 32, 32), -0.5), None, "-0.5"),
    ("int32_pixels", torch.zeros(1, 3, 32, 32, dtype=torch.int32), None, "int32"),
]


@pytest.mark.parametrize(
    ("images", "keep", "pattern"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_forward_images_rejects(vit: MaskedTeacher, images: Any, keep: Any, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        vit.forward_images(images, keep)


def test_forward_patches_rejects_wrong_patch_dim(vit: MaskedTeacher) -> None:
    patches = torch.zeros(2, 3, vit.patch_dim - 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=str(vit.patch_dim - 1)):
        vit.forward_patches(patches, random_keep(2, 3))


def test_forward_patches_rejects_count_mismatch(vit: MaskedTeacher) -> None:
    patches = torch.zeros(2, 4, vit.patch_dim, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(2, 3, 192\)"):
        vit.forward_patches(patches, random_keep(2, 3))


def test_forward_patches_rejects_2d_tensor(vit: MaskedTeacher) -> None:
    patches = torch.zeros(2, vit.patch_dim, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(2, 192\)"):
        vit.forward_patches(patches, random_keep(2, 1))


def test_forward_patches_rejects_ragged_row_shape(vit: MaskedTeacher) -> None:
    patches = [torch.zeros(2, vit.patch_dim), torch.zeros(3, vit.patch_dim)]
    keep = [torch.tensor([0, 1]), torch.tensor([4, 5])]
    with pytest.raises(ValueError, match=r"patches row 1 has shape \(3, 192\)"):
        vit.forward_patches(patches, keep)


def test_forward_patches_rejects_row_count_mismatch(vit: MaskedTeacher) -> None:
    patches = [torch.zeros(2, vit.patch_dim)]
    keep = [torch.tensor([0, 1]), torch.tensor([4, 5])]
    with pytest.raises(ValueError, match="2 rows for a batch of 1"):
        vit.forward_patches(patches, keep)


def test_forward_patches_rejects_bad_pixels(vit: MaskedTeacher) -> None:
    patches = torch.full((1, 3, vit.patch_dim), 2.0)
    with pytest.raises(ValueError, match="outside"):
        vit.forward_patches(patches, random_keep(1, 3))


def test_forward_patches_rejects_duplicate_index(vit: MaskedTeacher) -> None:
    patches = torch.zeros(1, 2, vit.patch_dim, dtype=torch.uint8)
    with pytest.raises(ValueError, match="index 4 more than once"):
        vit.forward_patches(patches, torch.tensor([[4, 4]]))


@pytest.mark.parametrize(
    ("name", "kwargs", "pattern"),
    [
        ("resnet18", {}, "no patch_embed"),
        (
            "swin_tiny_patch4_window7_224",
            {"embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
            "no blocks",
        ),
        ("vit_tiny_patch16_224", {"dynamic_img_size": True, "depth": 1}, "dynamic_img_size"),
        ("vit_tiny_r_s16_p8_224", {"depth": 1}, "HybridEmbed"),
    ],
    ids=["convnet", "swin", "dynamic_img_size", "hybrid"],
)
def test_unsupported_architecture_raises(name: str, kwargs: dict[str, Any], pattern: str) -> None:
    model = timm.create_model(name, **kwargs)
    with pytest.raises(ValueError, match=pattern) as caught:
        check_supported(model, name)
    assert name in str(caught.value)


def test_from_source_rejects_convnet() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        MaskedTeacher.from_source("resnet18", random_init=True)


def test_spec_model_mismatch_raises(vit: MaskedTeacher) -> None:
    other = timm.create_model("vit_tiny_patch16_224", **{**SMALL, "img_size": 48})
    with pytest.raises(ValueError, match="img_size"):
        MaskedTeacher(other, vit.spec)


def test_cpu_autocast_rejected(vit: MaskedTeacher) -> None:
    with pytest.raises(ValueError, match="CUDA"):
        MaskedTeacher(vit.model, vit.spec, amp_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_close_to_float32(amp_dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model, spec = load_teacher("vit_tiny_patch16_224", random_init=True, model_kwargs=SMALL)
    reference = MaskedTeacher(model, spec).forward_images(random_images(4), random_keep(4, 8))
    engine = MaskedTeacher(model, spec, device="cuda", amp_dtype=amp_dtype)
    logits = engine.forward_images(random_images(4).cuda(), random_keep(4, 8).cuda())
    assert logits.dtype == torch.float32
    assert (logits.cpu() - reference).abs().max() < 0.05
