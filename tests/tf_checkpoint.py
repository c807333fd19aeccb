"""Writes an OpenAI-style GPT-2 release directory with TensorFlow itself: OpenAI's
variable names, [1, in, out] Conv1D weights, a TF1 Saver checkpoint, hparams.json."""

import json
from pathlib import Path

from gptfn.weights.openai_tf import tf_name


def write_openai_checkpoint(params, config, out: Path, drop=(), bad_shape=()):
    import tensorflow as tf

    out.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        for key, t in params.items():
            name = tf_name(key)
            if name in drop:
                continue
            value = t.numpy()
            if key.endswith(".weight") and (".attn." in key or ".mlp." in key):
                value = value[None]  # Conv1D weights are stored [1, in, out]
            if name in bad_shape:
                value = value[..., :-1]
            tf.compat.v1.get_variable(name, initializer=value)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(out / "model.ckpt"))
    (out / "hparams.json").write_text(json.dumps({
        "n_vocab": config.vocab_size, "n_ctx": config.context_length, "n_embd": config.embed_dim,
        "n_head": config.num_heads, "n_layer": config.num_layers}))
    (out / "encoder.json").write_text("{}")
    (out / "vocab.bpe").write_text("#version: 0.2\n")
    return out
