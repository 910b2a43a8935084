#!/usr/bin/env node
// Fails when the modules of src/ import each other in a circle. Every import counts: value and
// type-only imports, re-exports, and import('...') types, since a type-only circle still ties
// the modules' designs together (issue 13). Part of `npm run lint`.
//   node scripts/check-cycles.js [dir]     (default: src)
'use strict'
const fs = require('node:fs')
const path = require('node:path')
const ts = require('typescript')

const root = path.resolve(__dirname, '..', process.argv[2] ?? 'src')

function files(dir) {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name)
    if (e.isDirectory()) return files(p)
    return e.name.endsWith('.ts') && !e.name.endsWith('.d.ts') ? [p] : []
  })
}

function resolve(from, spec) {
  if (!spec.startsWith('.')) return null
  const base = path.resolve(path.dirname(from), spec)
  for (const candidate of [`${base}.ts`, path.join(base, 'index.ts')]) if (fs.existsSync(candidate)) return candidate
  return null
}

/** Every relative module `file` imports, in any form. */
function importsOf(file) {
  const source = ts.createSourceFile(file, fs.readFileSync(file, 'utf8'), ts.ScriptTarget.Latest, true)
  const specs = []
  const visit = (node) => {
    if ((ts.isImportDeclaration(node) || ts.isExportDeclaration(node)) && node.moduleSpecifier) {
      specs.push(node.moduleSpecifier.text)
    } else if (ts.isImportTypeNode(node) && ts.isLiteralTypeNode(node.argument)) {
      specs.push(node.argument.literal.text)
    } else if (ts.isCallExpression(node) && node.expression.kind === ts.SyntaxKind.ImportKeyword) {
      const [arg] = node.arguments
      if (arg && ts.isStringLiteral(arg)) specs.push(arg.text)
    }
    ts.forEachChild(node, visit)
  }
  visit(source)
  return [...new Set(specs.map((s) => resolve(file, s)).filter((f) => f !== null))]
}

// Tarjan's strongly connected components: every component of more than one module (or a module
// importing itself) is a cycle.
function cycles(graph) {
  let index = 0
  const stack = []
  const info = new Map()
  const found = []
  const connect = (v) => {
    info.set(v, { index, low: index, onStack: true })
    index++
    stack.push(v)
    for (const w of graph.get(v) ?? []) {
      if (!info.has(w)) {
        connect(w)
        info.get(v).low = Math.min(info.get(v).low, info.get(w).low)
      } else if (info.get(w).onStack) {
        info.get(v).low = Math.min(info.get(v).low, info.get(w).index)
      }
    }
    if (info.get(v).low === info.get(v).index) {
      const component = []
      let w
      do {
        w = stack.pop()
        info.get(w).onStack = false
        component.push(w)
      } while (w !== v)
      if (component.length > 1 || (graph.get(v) ?? []).includes(v)) found.push(component)
    }
  }
  for (const v of graph.keys()) if (!info.has(v)) connect(v)
  return found
}

const graph = new Map(files(root).map((f) => [f, importsOf(f)]))
const found = cycles(graph)
const rel = (f) => path.relative(path.dirname(root), f)
if (found.length > 0) {
  for (const c of found) {
    console.error(`import cycle among ${c.length} modules:`)
    for (const f of c.sort()) {
      const inside = graph.get(f).filter((g) => c.includes(g))
      console.error(`  ${rel(f)} -> ${inside.map(rel).join(', ')}`)
    }
  }
  process.exit(1)
}
console.log(`check-cycles: ${graph.size} modules under ${rel(root)}, no import cycle`)
