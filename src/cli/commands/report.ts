// `userfaultfd report FILE`: a fault trace (FaultServer { trace }, serve --trace) drawn as one
// self-contained HTML page; the page itself is ../../report/html.ts.
import * as fs from 'node:fs'
import * as path from 'node:path'
import { reportHtml } from '../../report/html'
import { TraceFileError, readFaultTrace } from '../../report/trace-file'
import { checkWritableFile } from '../checks'
import { UsageError, defineCommand } from '../command'
import { text } from '../options'

export const reportCommand = defineCommand({
  name: 'report',
  summary: 'draw a fault trace (serve --trace, FaultServer { trace }) as a self-contained HTML page',
  synopsis: 'FILE [-o HTML]',
  description: `Reads a fault trace written by \`serve --trace FILE\` or FaultServer({ trace }) (Chrome trace-event JSON, which Perfetto also opens) and writes one HTML page with no script and no network access: a summary (faults by kind, waits, threads), memory present over time, a histogram of fault waits, and a heat map of fault addresses over time.

A trace whose writer was killed before it finished is drawn as far as it goes, with a warning.`,
  argument: { value: 'FILE', help: 'the fault trace to draw' },
  options: {
    output: text({
      short: 'o',
      value: 'HTML',
      help: 'where to write the page: a file, or - for stdout (default: FILE with .html for its .json).',
    }),
  },
  exitStatus: ['0  the page was written', '1  it could not be written', '2  usage error (FILE is not a fault trace)'],
  examples: [
    'userfaultfd serve --socket uffd.sock --mem-file mem --trace restore.json',
    'userfaultfd report restore.json  # writes restore.html',
    'userfaultfd report restore.json -o - > page.html',
  ],
  check(v) {
    if (v.output !== undefined && v.output !== '-') checkWritableFile(v.output, '--output')
  },
  run(v, file) {
    let data: ReturnType<typeof readFaultTrace>
    try {
      data = readFaultTrace(file)
    } catch (err) {
      if (err instanceof TraceFileError) throw new UsageError(err.message)
      throw err
    }
    const html = reportHtml(data, path.basename(file))
    if (v.output === '-') {
      process.stdout.write(html)
      return 0
    }
    const out = v.output ?? `${file.replace(/\.json$/i, '')}.html`
    if (v.output === undefined) checkWritableFile(out, 'the page')
    fs.writeFileSync(out, html)
    const faults = data.faults.filter((f) => f.kind === 'demand' || f.kind === 'zero').length
    process.stderr.write(
      `userfaultfd report: ${out} (${faults} fault(s)${data.incomplete ? ', from an incomplete trace' : ''})\n`,
    )
    return 0
  },
})
