"""Slicer's translation functions, or the source text where the application has none (slicer-core).

Re-exported as the same function objects: ``slicer.i18n.tr`` reads the translation context from its
caller's file, so each module still gets its own context when it imports ``tr as _`` from here.
"""

try:
    from slicer.i18n import tr, translate
except ImportError:  # slicer-core, without the application
    def tr(text):
        return text

    def translate(context, text):
        return text

__all__ = ["tr", "translate"]
