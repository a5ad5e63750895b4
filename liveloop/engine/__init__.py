"""The one batched decode loop, shared by serving, the trainer's rollouts and the gates.

``batch`` holds the running batch's KV cache, ``sequence`` one sequence being generated, ``model_runner`` the step
(prefill newcomers, sample, decode, drop finished rows) and ``offline`` a synchronous ``generate`` that drives that
step to completion; serving's threaded engine drives the same step (``serving.engine``).
"""
