"""Routing controller: a policy that decides, per diffusion step, which attention layers serve their
student and which keep full attention, trained with REINFORCE (docs/controller.md)."""
