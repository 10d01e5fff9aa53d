"""SiT model: reference key names and shapes, parameter counts, init, forward contract (docs/objective.md
§Model, §Projector)."""

import math

import numpy as np
import pytest
import torch

from repa_fast.models.sit import SiT, SiT_models, TimestepEmbedder, build_sit, get_2d_sincos_pos_embed


def reference_state_dict_shapes(depth, D, p, C=4, num_classes=1000, z_dims=(768,), proj=2048, qk_norm=False):
    """Key -> shape of a reference REPA SiT checkpoint, written from docs/objective.md §Model (not from our model)."""
    T = (32 // p) ** 2
    shapes = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + 1, D),
        "final_layer.linear.weight": (p * p * C, D),
        "final_layer.linear.bias": (p * p * C,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D),
        "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "attn.qkv.weight": (3 * D, D),
                b + "attn.qkv.bias": (3 * D,),
                b + "attn.proj.weight": (D, D),
                b + "attn.proj.bias": (D,),
                b + "mlp.fc1.weight": (4 * D, D),
                b + "mlp.fc1.bias": (4 * D,),
                b + "mlp.fc2.weight": (D, 4 * D),
                b + "mlp.fc2.bias": (D,),
                b + "adaLN_modulation.1.weight": (6 * D, D),
                b + "adaLN_modulation.1.bias": (6 * D,),
            }
        )
        if qk_norm:
            hd = 64  # head_dim of S, B and L
            for n in ("q_norm", "k_norm"):
                shapes.update({b + f"attn.{n}.weight": (hd,), b + f"attn.{n}.bias": (hd,)})
    for k, z in enumerate(z_dims):
        shapes.update(
            {
                f"projectors.{k}.0.weight": (proj, D),
                f"projectors.{k}.0.bias": (proj,),
                f"projectors.{k}.2.weight": (proj, proj),
                f"projectors.{k}.2.bias": (proj,),
                f"projectors.{k}.4.weight": (z, proj),
                f"projectors.{k}.4.bias": (z,),
            }
        )
    return shapes


def test_xl2_strict_load_of_reference_keys_and_parameter_counts():
    with torch.device("meta"):
        model = SiT_models["SiT-XL/2"](z_dims=[768], encoder_depth=8)
        sd = {k: torch.empty(s) for k, s in reference_state_dict_shapes(28, 1152, 2).items()}
    model.load_state_dict(sd, strict=True, assign=True)  # raises on any missing/unexpected key or shape
    n_backbone = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("projectors"))
    n_proj = sum(p.numel() for k, p in model.named_parameters() if k.startswith("projectors"))
    assert round(n_backbone / 1e6, 1) == 675.1, n_backbone
    assert round(n_proj / 1e6, 2) == 8.13, n_proj
    assert not model.pos_embed.requires_grad


@pytest.mark.parametrize("name,depth,D", [("SiT-B/2", 12, 768), ("SiT-L/2", 24, 1024)])
def test_reference_keys_for_other_sizes(name, depth, D):
    with torch.device("meta"):
        model = SiT_models[name](z_dims=[768, 1024], encoder_depth=4, qk_norm=True)
    expected = reference_state_dict_shapes(depth, D, 2, z_dims=(768, 1024), qk_norm=True)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_strict_load_real_values_roundtrip():
    torch.manual_seed(1)
    src = SiT_models["SiT-S/2"](input_size=16, z_dims=[64], encoder_depth=2, depth=3)
    for p in src.parameters():
        p.data.normal_()
    dst = SiT_models["SiT-S/2"](input_size=16, z_dims=[64], encoder_depth=2, depth=3)
    dst.load_state_dict(src.state_dict(), strict=True)
    src.eval(), dst.eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randint(0, 1000, (2,))
    a, b = src(x, t, y), dst(x, t, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
    assert a[0].abs().sum() > 0


def test_registry_names_and_sizes():
    assert set(SiT_models) >= {f"SiT-{s}/{p}" for s in "S B L XL".split() for p in (2, 4, 8)}
    with torch.device("meta"):
        for name, (depth, D, heads) in {"SiT-S/4": (12, 384, 6), "SiT-B/8": (12, 768, 12)}.items():
            m = SiT_models[name](z_dims=[])
            assert len(m.blocks) == depth and m.pos_embed.shape[-1] == D and m.num_heads == heads
    with pytest.raises(ValueError, match="unknown model 'SiT-XXL/2'.*SiT-XL/2"):
        build_sit("SiT-XXL/2")


@pytest.mark.parametrize("depth_arg", [0, 13, -1])
def test_encoder_depth_out_of_range_is_a_clear_error(depth_arg):
    with pytest.raises(ValueError, match=rf"encoder_depth={depth_arg} must be in 1\.\.12"):
        SiT_models["SiT-B/2"](encoder_depth=depth_arg, z_dims=[768])


def test_decoder_hidden_size_mismatch_is_rejected():
    with pytest.raises(ValueError, match="decoder_hidden_size=768 differs from hidden_size=384"):
        SiT_models["SiT-S/2"](decoder_hidden_size=768)


def test_init_output_is_exactly_zero_and_zero_layers():
    model = SiT_models["SiT-S/2"](input_size=16, z_dims=[32], encoder_depth=3, depth=4)
    for block in model.blocks:
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0 and block.adaLN_modulation[-1].bias.abs().sum() == 0
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        assert layer.weight.abs().sum() == 0 and layer.bias.abs().sum() == 0
    # Non-zero where docs/objective.md §Model says random.
    assert model.blocks[0].attn.qkv.weight.std() > 0 and model.projectors[0][0].weight.std() > 0
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    out, zs = model(torch.randn(3, 4, 16, 16), torch.rand(3), torch.randint(0, 1000, (3,)))
    assert out.shape == (3, 4, 16, 16) and torch.count_nonzero(out) == 0
    assert zs[0].shape == (3, 64, 32) and zs[0].abs().sum() > 0


def test_xavier_init_bounds():
    torch.manual_seed(0)
    model = SiT_models["SiT-S/2"](input_size=16, z_dims=[], depth=1)
    w = model.blocks[0].attn.qkv.weight  # xavier on the whole (3D, D) matrix
    bound = math.sqrt(6 / (w.shape[0] + w.shape[1]))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    pw = model.x_embedder.proj.weight
    pbound = math.sqrt(6 / (pw.shape[0] + pw[0].numel()))
    assert pw.abs().max() <= pbound and pw.abs().max() > 0.95 * pbound
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0


def test_pos_embed_matches_spec_formula():
    D, g = 16, 4
    emb = get_2d_sincos_pos_embed(D, g)
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D // 4))
    for r in range(g):
        for c in range(g):
            expect = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
            np.testing.assert_allclose(emb[r * g + c], expect, rtol=0, atol=1e-12)
    model = SiT_models["SiT-S/2"](input_size=8, z_dims=[], depth=1)
    np.testing.assert_allclose(model.pos_embed[0].numpy(), get_2d_sincos_pos_embed(384, 4).astype(np.float32))


def test_timestep_embedding_is_cos_then_sin_raw_t():
    t = torch.tensor([0.0, 0.37, 1.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000) * k / 128)
    args = t.double()[:, None] * freqs
    torch.testing.assert_close(emb.double(), torch.cat([args.cos(), args.sin()], 1), atol=1e-6, rtol=0)


def test_unpatchify_inverts_patchify_non_square_channel_order():
    model = SiT_models["SiT-S/4"](input_size=16, in_channels=3, z_dims=[], depth=1)
    img = torch.randn(2, 3, 16, 16)
    p, g = 4, 4
    # patchify as docs/objective.md §Model says: token (h, w) holds pixels [h p + i, w p + j] as (i, j, c)
    tokens = img.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), img)


def test_label_dropout_rate_and_null_class():
    model = SiT(
        input_size=8,
        patch_size=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.3,
        z_dims=[],
    )
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.randint(0, 10, (20000,))
    dropped = emb.token_drop(labels)
    rate = (dropped == 10).float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    assert torch.equal(emb(labels[:5], train=False), emb.embedding_table(labels[:5]))
    forced = emb(labels[:3], train=False, force_drop_ids=torch.tensor([1, 0, 1]))
    assert torch.equal(forced[0], emb.embedding_table.weight[10])
    assert torch.equal(forced[1], emb.embedding_table(labels[1]))


def test_projectors_not_run_when_zs_not_needed():
    model = SiT_models["SiT-S/2"](input_size=8, z_dims=[16, 8], encoder_depth=1, depth=2)
    calls = []
    for proj in model.projectors:
        proj.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 1000, (2,))
    out, zs = model(x, t, y, return_zs=False)
    assert zs == [] and calls == []
    out2, zs2 = model(x, t, y)
    assert len(calls) == 2 and [z.shape[-1] for z in zs2] == [16, 8]
    assert torch.equal(out, out2)


def test_sit_s_trains_forward_backward():
    """The reference's SiT-S crashes (final layer built at width 768); ours runs and gets gradients."""
    model = SiT_models["SiT-S/2"](input_size=8, z_dims=[32], encoder_depth=2, depth=2)
    out, zs = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 1000, (2,)))
    (out.sum() + zs[0].sum()).backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_qk_norm_and_rope_change_the_function():
    torch.manual_seed(0)
    kw = dict(input_size=8, z_dims=[], depth=2)
    base = SiT_models["SiT-S/2"](**kw)
    for p in base.parameters():
        p.data.normal_(0, 0.05)
    rope = SiT_models["SiT-S/2"](use_rope=True, **kw)
    rope.load_state_dict(base.state_dict(), strict=True)  # RoPE adds no state-dict keys
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 1000, (2,))
    base.eval(), rope.eval()
    assert (base(x, t, y)[0] - rope(x, t, y)[0]).abs().max() > 1e-4


def test_null_class_row_exists_even_without_label_dropout():
    model = SiT(
        input_size=8,
        patch_size=4,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        class_dropout_prob=0.0,
        z_dims=[],
    ).eval()
    assert model.y_embedder.embedding_table.num_embeddings == 11
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    assert model(x, t, torch.tensor([10, 3]))[0].shape == (2, 4, 8, 8)  # CFG's null label works
    labels = torch.randint(0, 10, (1000,))
    assert torch.equal(model.y_embedder.token_drop(labels), labels)  # and nothing is dropped


def _spec_forward(sd, x, t, y, depth, heads, patch, tap):
    """SiT forward written from docs/objective.md §Model alone (float64, explicit softmax), for an independent check."""
    import torch.nn.functional as F

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def ln(h):
        return F.layer_norm(h, (h.shape[-1],), eps=1e-6)

    B, C = x.shape[:2]
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (B, T, D)
    D = tok.shape[-1]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    t_feat = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    c = lin(F.silu(lin(t_feat, "t_embedder.mlp.0")), "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    zs = None
    for i in range(depth):
        b = f"blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, -1)
        h = ln(tok) * (1 + scale1[:, None]) + shift1[:, None]
        q, k, v = lin(h, b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = ((q * (D // heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v  # (B, H, T, Dh)
        tok = tok + gate1[:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        h = ln(tok) * (1 + scale2[:, None]) + shift2[:, None]
        tok = tok + gate2[:, None] * lin(F.gelu(lin(h, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        if i + 1 == tap:
            zs = lin(F.silu(lin(F.silu(lin(tok, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(ln(tok) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")  # (B, T, p*p*C)
    g = x.shape[-1] // patch
    out = out.reshape(B, g, g, patch, patch, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * patch, g * patch)
    return out, zs


@pytest.mark.parametrize("impl", ["ref", "auto"])
def test_forward_equals_the_spec_equations(impl):
    torch.manual_seed(0)
    model = SiT_models["SiT-S/2"](input_size=8, depth=3, z_dims=[24], encoder_depth=2, impl=impl).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3 / math.sqrt(p.shape[-1]))
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.tensor([3, 1000])
    out, zs = model(x, t, y)
    ref_out, ref_z = _spec_forward(model.state_dict(), x, t, y, depth=3, heads=6, patch=2, tap=2)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(zs[0], ref_z, atol=1e-10, rtol=1e-9)
    assert out.abs().max() > 1e-2  # a non-trivial function (random adaLN, not the zero init)
