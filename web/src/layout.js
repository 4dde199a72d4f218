// Left-to-right layout of a stage graph with dagre (no layout of our own).
import dagre from '@dagrejs/dagre';

export const NODE_W = 230;
export const NODE_H = 150;

// `nodes`: [{id, ...}], `edges`: [{source, target}]; returns the nodes with `position` set.
export function layout(nodes, edges, size = { width: NODE_W, height: NODE_H }) {
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: 'LR', nodesep: 30, ranksep: 70, marginx: 20, marginy: 20 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const n of nodes) g.setNode(n.id, { width: size.width, height: size.height });
  for (const e of edges) g.setEdge(e.source, e.target);
  dagre.layout(g);
  return nodes.map((n) => {
    const p = g.node(n.id);
    return { ...n, position: { x: p.x - size.width / 2, y: p.y - size.height / 2 } };
  });
}
