"""Run in a subprocess with 8 simulated CPU devices (tests/test_sharding.py): a tiny LaMed or M3D-CLIP
created sharded on several meshes, with the batch sharded over the data axes, gives the single-device
loss and gradients (for CLIP: the contrastive loss over the GLOBAL batch), with every parameter laid out
as the rules table says, and activations laid out by the rules `activation_mesh` is given.
Usage: sharding_check.py {lamed,clip} MESH..."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from m3d_jax.models.clip import ClipConfig, M3DClip, clip_loss  # noqa: E402
from m3d_jax.models.decoder_presets import tiny_phi3  # noqa: E402
from m3d_jax.models.lamed import Lamed, LamedConfig, lamed_loss  # noqa: E402
from m3d_jax.models.text_encoder import BertConfig  # noqa: E402
from m3d_jax.models.vit3d import ViT3DConfig  # noqa: E402
from m3d_jax.sharding import (  # noqa: E402
    LOGICAL_RULES, MeshConfig, activation_mesh, batch_sharding, constrain, create_sharded, logical_axes, make_mesh,
    spec_for,
)

CONFIG = LamedConfig(vision=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2,
                                        num_heads=4),
                     decoder=tiny_phi3(vocab_size=516), image_token_id=512, seg_token_id=515, seg_decoder_heads=4,
                     seg_decoder_mlp_dim=96, seg_iou_head_hidden=32)


CLIP_CONFIG = ClipConfig(vision=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2,
                                           num_heads=4, select_feature="cls_patch"),
                         text=BertConfig(vocab_size=120, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                         max_position_embeddings=32), embed_dim=32)


def clip_batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 120, (8, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < rng.integers(4, 13, (8, 1))).astype(np.int32)
    return dict(images=rng.random((8, 1, 16, 64, 64), dtype=np.float32), input_ids=ids, attention_mask=mask)


def batch():
    rng = np.random.default_rng(0)
    ids = np.concatenate([np.ones((8, 1)), np.full((8, 8), 512), rng.integers(3, 500, (8, 7))], 1).astype(np.int32)
    ids[:3, -2] = 515
    masks = np.zeros((8, 1, 16, 64, 64), np.float32)
    masks[:3, :, 4:10, 20:40, 10:30] = 1
    return dict(images=rng.random((8, 1, 16, 64, 64), dtype=np.float32), input_ids=ids,
                attention_mask=np.ones_like(ids), labels=np.where(np.arange(16) < 10, -100, ids), seg_masks=masks,
                image_starts=np.ones(8, np.int32))


# The table with the vocabulary kept whole: `constrain` must follow the rules `activation_mesh` was given.
VOCAB_WHOLE = tuple((name, None if name == "vocab" else axes) for name, axes in LOGICAL_RULES)

MODELS = {
    "lamed": (lambda: Lamed(CONFIG, rngs=nnx.Rngs(0)), lamed_loss, batch),
    "clip": (lambda: M3DClip(CLIP_CONFIG, rngs=nnx.Rngs(0)), clip_loss, clip_batch),
}


def padded(spec, ndim: int) -> list:
    """A PartitionSpec as a JSON list with one entry per dimension (trailing Nones kept)."""
    return [list(a) if isinstance(a, tuple) else a for a in (*spec, *[None] * (ndim - len(spec)))]


def loss_and_grads(model, data, loss_fn):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, data):
        return jax.value_and_grad(lambda s: loss_fn(nnx.merge(graphdef, s), data)[0])(state)

    return run(state, data)


def main(name, mesh_shapes):
    make, loss_fn, make_batch = MODELS[name]
    data = make_batch()
    ref_loss, ref_grads = loss_and_grads(make(), {k: jnp.asarray(v) for k, v in data.items()}, loss_fn)
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    results = {}
    for shape in mesh_shapes:
        mesh = make_mesh(MeshConfig(*shape))
        model = create_sharded(make, mesh)
        wrong = []
        for path, variable in nnx.to_flat_state(nnx.state(model)):
            expected = spec_for(logical_axes(variable), variable.shape, mesh)
            if variable[...].sharding.spec != expected:
                wrong.append(f"{path}: {variable[...].sharding.spec} != {expected}")
        sharded = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in data.items()}
        with activation_mesh(mesh):  # the activation constraints are traced in, as in the train step
            loss, grads = loss_and_grads(model, sharded, loss_fn)
            logits_like = jax.jit(lambda x: constrain(x, ("batch", None, "vocab")))(jnp.zeros((8, 4, 16)))
        with activation_mesh(mesh, rules=VOCAB_WHOLE):
            logits_vocab_whole = jax.jit(lambda x: constrain(x, ("batch", None, "vocab")))(jnp.zeros((8, 4, 16)))
        grad_err = max(float(jnp.max(jnp.abs(g[...] - ref_flat[p][...]))) for p, g in nnx.to_flat_state(grads))
        sharded_params = sum(1 for _, v in nnx.to_flat_state(nnx.state(model))
                             if not v[...].sharding.is_fully_replicated)
        results["x".join(map(str, shape))] = dict(loss_err=abs(float(loss) - float(ref_loss)), grad_err=grad_err,
                                                  wrong=wrong, sharded_params=sharded_params,
                                                  activation_spec=padded(logits_like.sharding.spec, 3),
                                                  vocab_whole_spec=padded(logits_vocab_whole.sharding.spec, 3))
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], [tuple(int(x) for x in arg.split("x")) for arg in sys.argv[2:]])
