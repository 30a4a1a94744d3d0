"""Exporters: one module per format, all returning an ExportReport."""
