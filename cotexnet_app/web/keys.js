// Keyboard shortcuts of the page, as in Slicer's Segment Editor: Ctrl+Z undoes the last edit, Ctrl+Y and
// Ctrl+Shift+Z redo it; arrow keys and Page Up/Down step the axial slice; 1-9 choose a segment; B paints,
// E erases, Escape puts the tool down; + and - change the brush size. Keys typed into a field are left to it.
const COTEXNET_KEYS = {
  ArrowUp: ["slice", 1], ArrowRight: ["slice", 1], PageUp: ["slice", 10],
  ArrowDown: ["slice", -1], ArrowLeft: ["slice", -1], PageDown: ["slice", -10],
  b: ["tool", "paint"], e: ["tool", "erase"], Escape: ["tool", "none"],
  "+": ["brush", 1], "=": ["brush", 1], "-": ["brush", -1],
};

window.addEventListener("keydown", (event) => {
  const target = event.target;
  if (target && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName))) return;
  if (!window.trame || event.altKey) return;
  const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
  let call = null;
  if (event.ctrlKey || event.metaKey) {
    call = key === "z" && !event.shiftKey ? ["cx_undo", []] : key === "y" || key === "z" ? ["cx_redo", []] : null;
  } else if (/^[1-9]$/.test(key)) {
    call = ["cx_key", ["segment", Number(key)]];
  } else if (COTEXNET_KEYS[key]) {
    call = ["cx_key", COTEXNET_KEYS[key]];
  }
  if (!call) return;
  event.preventDefault();
  window.trame.trigger(...call);
});
