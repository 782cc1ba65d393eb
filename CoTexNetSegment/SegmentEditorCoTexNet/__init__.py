"""The "CoTexNet" Segment Editor effect's folder. Nothing imports this package: Slicer loads
``SegmentEditorEffect.py`` as a module named after the folder (docs/slicer.md, "Effect loading").

This file exists for translations: ``slicer.i18n.tr`` names the context of a file that sits next to an
``__init__.py`` "<folder>.<file>" (Base/Python/slicer/i18n.py, ``getContext``), so the effect's strings get
the context ``SegmentEditorCoTexNet.SegmentEditorEffect`` instead of ``SegmentEditorEffect``, which every
scripted effect's file shares.
"""
