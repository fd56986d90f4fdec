"""Routes for ``foundation`` models out of the training process: simulation engines and deployable artifacts.

``foundation.integrations.torch_sim``: ``FoundationTorchSimModel``, a torch-sim ``ModelInterface`` (extra
``[torchsim]``). Each integration imports its engine only when it is imported itself.
"""
