"""Knowledge distillation's loss: the student matches the teacher's softened
next-token distributions (Hinton, Vinyals and Dean 2015)."""

import jax
import jax.numpy as jnp


def distillation_kl_sum(student_logits_BLV: jax.Array, teacher_logits_BLV: jax.Array, weights_BL: jax.Array,
                        temperature: float) -> jax.Array:
    """Sum over weighted tokens of T^2 * KL(teacher_T || student_T), where x_T is
    softmax(logits / T). The T^2 keeps its gradients on the scale of the cross-entropy's
    as T grows, so `alpha` weighs the two alike at any temperature."""
    teacher_log_p = jax.nn.log_softmax(teacher_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits_BLV.astype(jnp.float32) / temperature, axis=-1)
    kl_BL = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return temperature ** 2 * jnp.sum(kl_BL * weights_BL)
