// Every command of the `userfaultfd` CLI, in the order `userfaultfd --help` lists them. A new
// command is a new row here (and a file in this folder with its option table).
import type { Command } from '../command'
import { demoCommand } from './demo'
import { doctorCommand } from './doctor'
import { reportCommand } from './report'
import { serveCommand } from './serve'

export const commands: Command[] = [doctorCommand, serveCommand, demoCommand, reportCommand]
