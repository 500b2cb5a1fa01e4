"""Chat templates as data (jinja files + templates.json) and the Template that renders and masks."""

from martlet.templates.template import (IGNORE_INDEX, Template, get_template, mark_spans, register_template,
                                        resolve_style, template_entry, template_names)

__all__ = ["IGNORE_INDEX", "Template", "get_template", "mark_spans", "register_template", "resolve_style",
           "template_entry", "template_names"]
