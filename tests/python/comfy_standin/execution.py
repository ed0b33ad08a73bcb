"""Stand-in for the part of ComfyUI's execution.py that checks a prompt's widget values.

Upstream: execution.py validate_inputs(): inputs that VALIDATE_INPUTS names as arguments (or all,
when it takes **kwargs) skip the built-in checks (combo value in the list, FLOAT/INT min and
max); VALIDATE_INPUTS is then called with those inputs and anything but True is a
"custom_validation_failed" error whose details carry the returned string. Linked inputs
(values that are [node id, slot]) are not checked here, as upstream checks their types instead.
"""

import inspect


def validate_inputs(class_def, inputs):
    """Returns ComfyUI's error dicts for a node of `class_def` with widget values `inputs`."""
    class_inputs = class_def.INPUT_TYPES()
    specs = dict(class_inputs.get("required", {}))
    specs.update(class_inputs.get("optional", {}))
    validate = getattr(class_def, "VALIDATE_INPUTS", None)
    names, has_kwargs = [], False
    if validate is not None:
        spec = inspect.getfullargspec(validate)
        names, has_kwargs = spec.args, spec.varkw is not None
    errors = []
    for x, spec in specs.items():
        if x not in inputs:
            if x in class_inputs.get("required", {}):
                errors.append({"type": "required_input_missing", "details": x})
            continue
        val = inputs[x]
        if isinstance(val, list):  # a link
            continue
        if x in names or has_kwargs:
            continue
        input_type, extra = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(input_type, list) and val not in input_type:
            errors.append({"type": "value_not_in_list", "message": "Value not in list",
                           "details": "%s: '%s' not in %s" % (x, val, input_type)})
        elif input_type in ("INT", "FLOAT"):
            if "min" in extra and val < extra["min"]:
                errors.append({"type": "value_smaller_than_min", "details": x})
            if "max" in extra and val > extra["max"]:
                errors.append({"type": "value_bigger_than_max", "details": x})
    if validate is not None:
        filtered = {x: v for x, v in inputs.items() if x in names or has_kwargs}
        ret = validate(**filtered)
        if ret is not True:
            for x in filtered:
                details = x if ret is False else "%s - %s" % (x, ret)
                errors.append({"type": "custom_validation_failed",
                               "message": "Custom validation failed for node",
                               "details": details})
    return errors
