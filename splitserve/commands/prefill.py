from splitserve.commands.worker import add_args_for, run

add_args = add_args_for("prefill")
__all__ = ["add_args", "run"]
