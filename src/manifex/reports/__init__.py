"""HTML report templates (Jinja2) shared by the systems' report writers."""
