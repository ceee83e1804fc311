// Keyboard shortcuts for the console's judging pages. The pages work without this script (every
// action is a plain form button); it only maps keys to those buttons. No framework, no build.
"use strict";

const SHORTCUTS = {
  // blind evaluation: left, right, tie, both bad
  "verdict-left": ["ArrowLeft", "1"],
  "verdict-right": ["ArrowRight", "2"],
  "verdict-tie": ["t", "T", "3"],
  "verdict-both_bad": ["b", "B", "4"],
  // compare two
  "prefer-left": ["ArrowLeft", "1"],
  "prefer-right": ["ArrowRight", "2"],
};

document.addEventListener("keydown", (event) => {
  const target = event.target;
  // Typing in a field is typing, not a verdict.
  if (target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement ||
      target instanceof HTMLSelectElement) {
    return;
  }
  if (event.altKey || event.ctrlKey || event.metaKey) {
    return;
  }
  for (const [id, keys] of Object.entries(SHORTCUTS)) {
    const button = document.getElementById(id);
    if (button && !button.disabled && keys.includes(event.key)) {
      event.preventDefault();
      // One submission per page: a held key must not send the next pair's verdict unseen.
      for (const b of document.querySelectorAll("button[type=submit]")) {
        if (b !== button) b.disabled = true;
      }
      button.click();
      button.disabled = true;
      return;
    }
  }
});
