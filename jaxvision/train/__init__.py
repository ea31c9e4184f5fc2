"""Training core: mesh and sharding rules, train state and optimizers, the jitted step, Orbax
checkpoints, multi-host start-up and memory plans. Import the submodules directly
(`from jaxvision.train import step`); nothing heavy is imported here.
"""
