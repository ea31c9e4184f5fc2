"""The training core: everything a trainer needs around its loss, and nothing trainer-specific.

Read in this order: `mesh` (the `("data", "fsdp", "tensor")` mesh) and `sharding` (the one
logical-axis rules table); `optimizers`, `freeze`, `loss_scale` and `state` (the train state,
created directly in its shards); `step` (`make_train_step`: the AOT-compiled, donated, explicitly
sharded step); `checkpoints` (Orbax), `tracking` (metrics.jsonl, TensorBoard, W&B), `config` (typed
YAML configs with dotted overrides); `plan` (per-device memory without running); `distributed`
(multi-host start-up); `lora` (adapter maths); and `run`, the scaffold a trainer composes around
its loop (resolved config, checkpointer, restore-or-create, tracker, atomic export). The trainers
live in `jaxvision.trainers` and this package never imports them. Import the submodules directly
(`from jaxvision.train import step`); nothing heavy is imported here.
"""
