"""The evaluation report: figures (PNG) and one offline HTML page per run directory."""

from saescope.report.html import render_html, write_report

__all__ = ["render_html", "write_report"]
