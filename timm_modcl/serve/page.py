"""The small page served at ``/``: pick a task (or none), drop an image, see the top classes. No external assets."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>timm_modcl serve</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 2rem; text-align: center; margin: 1rem 0;
          cursor: pointer; }
  #drop.over { background: #eef; }
  #preview { max-width: 160px; max-height: 160px; display: none; margin: 0 auto 1rem; }
  table { border-collapse: collapse; width: 100%; }
  td, th { padding: .25rem .5rem; border-bottom: 1px solid #ddd; text-align: left; }
  .bar { background: #4a7; height: .8rem; }
  #error { color: #b00; }
</style>
</head>
<body>
<h1>timm_modcl serve</h1>
<label>Task: <select id="task"><option value="">(any: let the server choose)</option></select></label>
<div id="drop">Drop an image here, or click to choose one
  <input id="file" type="file" accept="image/*" style="display:none">
</div>
<img id="preview" alt="">
<p id="status"></p>
<p id="error"></p>
<table id="result" hidden><thead><tr><th>class</th><th>probability</th><th></th></tr></thead><tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
async function loadTasks() {
  const r = await fetch('v1/tasks');
  const body = await r.json();
  for (const t of body.tasks) {
    const o = document.createElement('option');
    o.value = t.name; o.textContent = t.name + ' (v' + t.version + ', ' + t.num_classes + ' classes)';
    $('task').appendChild(o);
  }
  document.body.dataset.tasks = String(body.tasks.length);
}
async function predict(file) {
  $('error').textContent = ''; $('status').textContent = 'predicting...';
  $('preview').src = URL.createObjectURL(file); $('preview').style.display = 'block';
  const task = $('task').value;
  const form = new FormData(); form.append('file', file);
  const url = task ? 'v1/tasks/' + encodeURIComponent(task) + '/predict' : 'v1/predict';
  try {
    const r = await fetch(url, {method: 'POST', body: form});
    const body = await r.json();
    if (!r.ok) { throw new Error(body.error ? body.error.message : r.statusText); }
    const p = body.predictions[0];
    $('status').textContent = 'task ' + p.task + ' (v' + p.version + ')' +
      (p.task_prob !== undefined ? ', chosen with probability ' + (100 * p.task_prob).toFixed(1) + '%' : '');
    const tbody = $('result').querySelector('tbody'); tbody.textContent = '';
    for (const c of p.top) {
      const tr = document.createElement('tr');
      const name = document.createElement('td'); name.className = 'cls';
      name.textContent = c.name !== null ? c.name : String(c['class']);
      const prob = document.createElement('td'); prob.textContent = (100 * c.prob).toFixed(2) + '%';
      const bar = document.createElement('td'); const b = document.createElement('div'); b.className = 'bar';
      b.style.width = Math.max(1, Math.round(200 * c.prob)) + 'px'; bar.appendChild(b);
      tr.append(name, prob, bar); tbody.appendChild(tr);
    }
    $('result').hidden = false;
    document.body.dataset.done = '1';
  } catch (e) {
    $('status').textContent = ''; $('error').textContent = String(e.message || e);
    document.body.dataset.done = 'error';
  }
}
$('drop').addEventListener('click', () => $('file').click());
let last = null;
$('file').addEventListener('change', () => {
  if ($('file').files.length) { last = $('file').files[0]; predict(last); }
  $('file').value = '';  // choosing the same file again fires 'change' again
});
$('task').addEventListener('change', () => { if (last) predict(last); });
$('drop').addEventListener('dragover', (e) => { e.preventDefault(); $('drop').classList.add('over'); });
$('drop').addEventListener('dragleave', () => $('drop').classList.remove('over'));
$('drop').addEventListener('drop', (e) => {
  e.preventDefault(); $('drop').classList.remove('over');
  if (e.dataTransfer.files.length) { last = e.dataTransfer.files[0]; predict(last); }
});
loadTasks().catch((e) => { $('error').textContent = 'cannot list tasks: ' + e; });
</script>
</body>
</html>
"""
