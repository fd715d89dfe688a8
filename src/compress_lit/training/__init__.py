"""Training a network from its config: the student distilled from a frozen teacher (``run.py``, the checks before
it in ``checks.py``, its teacher or cached teacher in ``teacher.py``) and the MoCo v2 pretraining (``pretrain.py``)."""
