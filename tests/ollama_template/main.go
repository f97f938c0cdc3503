// Renders an Ollama chat template with Go's own text/template, given the data Ollama's server
// gives a template that uses .Messages (its template.Execute): one pass over the whole chat with
// "System" (every system message, joined), "Messages" (role and content, system messages
// included) and "Response" empty. tests/test_ollama.py compares the result with transformers.
//
// stdin: {"template": "...", "system": "...", "messages": [{"role": "...", "content": "..."}]}
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
	System   string     `json:"system"`
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
	data := map[string]any{"System": req.System, "Messages": req.Messages, "Response": ""}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fail(err)
	}
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
