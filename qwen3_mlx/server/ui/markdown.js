"use strict";
// A small Markdown subset for model replies: ``` fences, inline code, bold, italic, headings,
// lists, links, paragraphs. The text is escaped before any markup is added, so a reply can never
// inject HTML of its own.
(() => {
  const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escape = (s) => s.replace(/[&<>"']/g, (c) => ENTITIES[c]);

  function inline(text) {
    // Code spans are set aside first: nothing inside them is Markdown.
    const codes = [];
    let s = escape(text).replace(/`([^`\n]+)`/g, (_, c) => `\u0000${codes.push(c) - 1}\u0000`);
    s = s
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?![*\w])/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?![_\w])/g, "$1<em>$2</em>")
      .replace(
        /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>',
      );
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[i]}</code>`);
  }

  function render(text) {
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let paragraph = [];
    let list = null; // {tag, items}
    const endParagraph = () => {
      if (paragraph.length) out.push(`<p>${inline(paragraph.join("\n")).replace(/\n/g, "<br>")}</p>`);
      paragraph = [];
    };
    const endList = () => {
      if (list) {
        const items = list.items.map((i) => `<li>${inline(i).replace(/\n/g, "<br>")}</li>`);
        out.push(`<${list.tag}>${items.join("")}</${list.tag}>`);
      }
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/);
      if (fence) {
        endParagraph();
        endList();
        const body = [];
        // A fence still open (the reply is streaming) runs to the end of the text.
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) body.push(lines[i]);
        const lang = fence[2] ? ` data-lang="${escape(fence[2])}"` : "";
        out.push(`<pre${lang}><code>${escape(body.join("\n"))}</code></pre>`);
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
      if (!line.trim()) {
        endParagraph();
        endList();
      } else if (heading) {
        endParagraph();
        endList();
        out.push(`<h${heading[1].length}>${inline(heading[2])}</h${heading[1].length}>`);
      } else if (item) {
        endParagraph();
        const tag = /\d/.test(item[1]) ? "ol" : "ul";
        if (list && list.tag !== tag) endList();
        list ??= { tag, items: [] };
        list.items.push(item[2]);
      } else if (list) {
        list.items[list.items.length - 1] += "\n" + line.trim();
      } else {
        paragraph.push(line);
      }
    }
    endParagraph();
    endList();
    return out.join("");
  }

  window.renderMarkdown = render;
})();
