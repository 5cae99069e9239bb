"""The rank side: what runs inside the processes the harness starts: the bootstrap of
every child, the zygote that forks ranks, the store host, a rank's task, the one place
that wraps torch.distributed (``hooks``) and the ``DDPFAULT_PLAN`` import hook.
Imports nothing from the parent side."""
