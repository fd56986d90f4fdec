"""Routes for ``foundation`` models out of the training process: simulation engines and deployable artifacts.

``foundation.integrations.torch_sim``: ``FoundationTorchSimModel``, a torch-sim ``ModelInterface`` (extra
``[torchsim]``). ``foundation.integrations.artifact``: ``foundation export torchscript``, one TorchScript file per
head that runs with plain torch (the scriptable model: ``deployed``, ``scripted``, ``scripted_lr``).
``foundation.integrations.lammps``: ``FoundationMLIAP``, LAMMPS' ML-IAP unified class over that file. Each
integration imports its engine only when it is imported itself.
"""
