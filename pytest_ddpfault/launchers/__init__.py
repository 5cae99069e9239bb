"""External launchers under test: unmodified scripts under ``torchrun`` or plain
``python``, armed through the ``DDPFAULT_PLAN`` import hook."""
