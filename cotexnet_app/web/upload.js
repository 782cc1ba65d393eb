// Sends a file the user chose to the session in chunks small enough for every websocket limit on the way
// (wslink's, trame's, the gateway's), with progress; a file over the cap is refused here, before any byte
// is sent. The server (CoTexNetWebApp.upload_*) writes each chunk to disk as it arrives.
window.cotexnetUpload = async function (file, trame) {
  if (!file) return;
  const state = trame.state;
  const limit = state.get("cx_upload_limit");
  const mib = (bytes) => (bytes / 1048576).toFixed(1);
  if (file.size > limit) {
    state.set("cx_error", `${file.name}: ${mib(file.size)} MiB is over the upload limit of ${mib(limit)} MiB; nothing was sent`);
    return;
  }
  const chunk = state.get("cx_upload_chunk_bytes");
  state.set("cx_error", "");
  state.set("cx_upload_progress", 0);
  if (!(await trame.trigger("cx_upload_begin", [file.name, file.size]))) return;  // refused: the server says why
  for (let offset = 0; offset < file.size; offset += chunk) {
    // A DataView, as trame sends a File's content: trame's trigger would turn a typed array (it has a
    // length) into a list of numbers.
    const bytes = new DataView(await file.slice(offset, offset + chunk).arrayBuffer());
    if (!(await trame.trigger("cx_upload_chunk", [offset, bytes]))) return;
    state.set("cx_upload_progress", Math.round((100 * (offset + bytes.byteLength)) / file.size));
  }
  await trame.trigger("cx_upload_end", []);
};
