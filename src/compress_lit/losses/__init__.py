"""The losses of every training method, as small pure functions (one file per method; the LightningModules in
:mod:`compress_lit.methods` own the heads, queues and encoders that feed them).

| method | loss | file |
|---|---|---|
| CompReSS | KL(teacher ‖ student) of softmaxes over a queue of anchors | ``compress.py`` |
| SEED | soft cross-entropy, teacher softmax over [own embedding, queue] | ``seed.py`` |
| Regression, Regression-BN, SimReg | mean of ``2 - 2 cos`` of normalised embeddings | ``regression.py`` |
| DisCo | MoCo v2's InfoNCE + w · consistency with the teacher on both views | ``disco.py`` |
| CRD | InfoNCE with per-anchor candidates from memories | ``crd.py`` |
"""
from .compress import CompReSSLoss, compress_loss, queue_similarities
from .crd import crd_info_nce
from .disco import disco_loss
from .regression import regression_loss
from .seed import seed_logits, seed_loss

__all__ = ["CompReSSLoss", "compress_loss", "crd_info_nce", "disco_loss", "queue_similarities", "regression_loss",
           "seed_logits", "seed_loss"]
