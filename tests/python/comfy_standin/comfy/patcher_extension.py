"""Stand-in for comfy/patcher_extension.py: callback kinds of ModelPatcher."""


class CallbacksMP:
    ON_CLONE = "on_clone"
    ON_LOAD = "on_load_after"
    ON_DETACH = "on_detach_after"
    ON_CLEANUP = "on_cleanup"
    ON_PRE_RUN = "on_pre_run"
    ON_PREPARE_STATE = "on_prepare_state"

    @classmethod
    def init_callbacks(cls):
        return {}
