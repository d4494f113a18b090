"""The partition explorer: a Partition as node-level data, a layered layout, one offline HTML page, and files for
other graph viewers (Google Model Explorer).

It sits just below ``monomod.report`` and reads only IR values, so a page can be drawn for ``inspect`` (a fresh
partition) and for a run (the partition its plan recorded) alike.
"""
from monomod.explorer.model_explorer import model_explorer_files
from monomod.explorer.page import explorer_html, page_data
from monomod.explorer.records import edge_records, node_records

__all__ = ["edge_records", "explorer_html", "model_explorer_files", "node_records", "page_data"]
