// Renders an Ollama chat template with Go's own text/template, given the data Ollama's server
// gives a template that uses .Messages (its template.Execute): one pass over the whole chat with
// "System" (every system message, joined), "Messages" (collated: consecutive messages of one role
// merged, system messages included) and "Response" empty. tests/test_ollama.py compares the result
// with transformers.
//
// stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}]}
// stdout: the prompt. A template without .Messages is refused: Ollama runs such a template once
// per turn, with other data, so this rendering would not be Ollama's.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string     `json:"template"`
	Messages []*message `json:"messages"`
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail(err)
	}
	// missingkey=zero: as Ollama parses templates
	tmpl, err := template.New("").Option("missingkey=zero").Parse(req.Template)
	if err != nil {
		fail(err)
	}
	if !usesMessages(tmpl.Root) {
		fail(fmt.Errorf("the template does not use .Messages: Ollama renders it once per turn, not as here"))
	}
	system, messages := collate(req.Messages)
	data := map[string]any{"System": system, "Messages": messages, "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fail(err)
	}
}

// collate: what Ollama's template.Execute makes of a chat before rendering it: every system
// message's content joined into System, and consecutive messages of one role (tool messages
// apart) merged into one, their contents joined by a blank line.
func collate(msgs []*message) (string, []*message) {
	var system []string
	var out []*message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

// usesMessages: whether any field or variable in the tree is .Messages (Ollama's test, by name).
func usesMessages(node parse.Node) bool {
	switch n := node.(type) {
	case *parse.ListNode:
		return n != nil && anyUses(n.Nodes)
	case *parse.ActionNode:
		return usesMessages(n.Pipe)
	case *parse.PipeNode:
		return n != nil && anyUses(commands(n.Cmds))
	case *parse.CommandNode:
		return anyUses(n.Args)
	case *parse.IfNode:
		return usesMessages(n.Pipe) || usesMessages(n.List) || usesMessages(n.ElseList)
	case *parse.RangeNode:
		return usesMessages(n.Pipe) || usesMessages(n.List) || usesMessages(n.ElseList)
	case *parse.WithNode:
		return usesMessages(n.Pipe) || usesMessages(n.List) || usesMessages(n.ElseList)
	case *parse.ChainNode: // (index .Messages 0).Role
		return usesMessages(n.Node) || named(n.Field)
	case *parse.FieldNode:
		return named(n.Ident)
	case *parse.VariableNode:
		return named(n.Ident)
	}
	return false
}

func anyUses(nodes []parse.Node) bool {
	for _, n := range nodes {
		if usesMessages(n) {
			return true
		}
	}
	return false
}

func commands(cmds []*parse.CommandNode) []parse.Node {
	nodes := make([]parse.Node, len(cmds))
	for i, c := range cmds {
		nodes[i] = c
	}
	return nodes
}

func named(ident []string) bool {
	for _, name := range ident {
		if strings.EqualFold(name, "Messages") {
			return true
		}
	}
	return false
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(2)
}
