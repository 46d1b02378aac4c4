(function(){
  function key(row, col){
    var cell = row.cells[col];
    if (!cell) return null;
    var raw = cell.hasAttribute('data-sort') ? cell.getAttribute('data-sort') : cell.textContent;
    raw = raw.trim();
    if (raw === '' || raw === '–') return null;
    var num = Number(raw);
    return isNaN(num) ? raw.toLowerCase() : num;
  }
  function sortBy(th){
    var table = th.closest('table'), body = table.tBodies[0];
    var col = Number(th.getAttribute('data-col'));
    var now = th.getAttribute('aria-sort');
    var dir = now === 'ascending' ? 'descending' : now === 'descending' ? 'ascending' :
      (th.getAttribute('data-first') || 'ascending');
    table.querySelectorAll('th[aria-sort]').forEach(function(h){
      h.setAttribute('aria-sort', 'none');
    });
    th.setAttribute('aria-sort', dir);
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function(a, b){
      var x = key(a, col), y = key(b, col);
      if (x === null || y === null) return (x === null) - (y === null);
      var c = (typeof x === 'number' && typeof y === 'number') ? x - y :
        String(x).localeCompare(String(y));
      return dir === 'ascending' ? c : -c;
    });
    rows.forEach(function(r){ body.appendChild(r); });
    var live = document.getElementById('sort-status');
    if (live) live.textContent = 'sorted by ' + th.textContent.trim() + ', ' + dir;
  }
  document.querySelectorAll('table.sortable th[aria-sort] button').forEach(function(b){
    b.addEventListener('click', function(){ sortBy(b.closest('th')); });
  });
  var thumbs = null;
  function fillThumbs(panel){  // ranking thumbnails: one shared copy of each image's data
    if (thumbs === null) {
      var map = document.getElementById('thumbs');
      thumbs = map ? JSON.parse(map.textContent) : {};
    }
    panel.querySelectorAll('span.thumb[data-thumb]').forEach(function(s){
      var uri = thumbs[s.getAttribute('data-thumb')];
      if (!uri) return;
      var img = document.createElement('img');
      img.src = uri;
      img.alt = s.getAttribute('aria-label') || '';
      s.replaceWith(img);
    });
  }
  document.querySelectorAll('details.panel').forEach(function(d){
    d.addEventListener('toggle', function(){ if (d.open) fillThumbs(d); });
  });
  window.addEventListener('load', function(){
    var imgs = Array.prototype.slice.call(document.images);
    var ok = imgs.filter(function(i){ return i.complete && i.naturalWidth > 0; }).length;
    document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
  });
})();
